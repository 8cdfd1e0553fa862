//! The offloader's asynchronous-upload plumbing, checked without a GPU: a device that behaves as
//! the CPU device but, like the CUDA device, hands out a fence for every upload out of its own
//! transfer memory. Every fence must reach the compute side ([`Device::wait_fence`], through
//! `Fetched::ready`) before the weights are used, disk read buffers must wait for the copy out
//! of them before they are read into again, the KV cache staged through transfer memory must
//! wait the same way, and the tokens must not change.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Result;
use backend_native::device::cpu::{CpuDevice, CpuOptions, CpuTensor};
use backend_native::device::{
    host_slice, Activation, AlignedBuf, AttnShape, DType, Device, DeviceTensor, Fence, FenceImpl,
    HostSlice, Sampling,
};
use backend_native::generate::{GenOptions, SampleMode};
use backend_native::model::{load_config, Checkpoint};
use backend_native::schedule::{generate_offloaded, OffloadModel, ScheduleOptions};
use bench_core::Policy;
use half::f16;
use serde::Deserialize;

#[derive(Default)]
struct Counts {
    made: AtomicUsize,
    compute_waits: AtomicUsize,
    host_waits: AtomicUsize,
}

/// Marks this device's transfer memory (as pinned memory marks the CUDA device's).
struct Transfer;

struct CountedFence(Arc<Counts>);

impl FenceImpl for CountedFence {
    fn wait_host(&self) -> Result<()> {
        self.0.host_waits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

struct FencingDevice {
    cpu: CpuDevice,
    counts: Arc<Counts>,
}

impl Device for FencingDevice {
    type Tensor = CpuTensor;
    fn name(&self) -> String {
        format!("fencing {}", self.cpu.name())
    }
    fn act_dtype(&self) -> DType {
        self.cpu.act_dtype()
    }
    fn kv_dtype(&self) -> DType {
        self.cpu.kv_dtype()
    }
    fn upload(&self, data: HostSlice<'_>, shape: &[usize]) -> Result<CpuTensor> {
        self.cpu.upload(data, shape)
    }
    fn upload_compressed(
        &self,
        bytes: &[u8],
        shape: &[usize],
        group_dim: usize,
    ) -> Result<CpuTensor> {
        self.cpu.upload_compressed(bytes, shape, group_dim)
    }
    fn write(&self, dst: &mut CpuTensor, offset: usize, data: HostSlice<'_>) -> Result<()> {
        self.cpu.write(dst, offset, data)
    }
    fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<CpuTensor> {
        self.cpu.zeros(dtype, shape)
    }
    fn download_f32(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        self.cpu.download_f32(t)
    }
    fn download_u32(&self, t: &CpuTensor) -> Result<Vec<u32>> {
        self.cpu.download_u32(t)
    }
    fn download_f16(&self, t: &CpuTensor, offset: usize, out: &mut [f16]) -> Result<()> {
        self.cpu.download_f16(t, offset, out)
    }
    fn synchronize(&self) -> Result<()> {
        self.cpu.synchronize()
    }
    fn alloc_host(&self, bytes: usize) -> Result<AlignedBuf> {
        let mut inner = AlignedBuf::new(bytes)?;
        let (ptr, len) = (inner.bytes_mut().as_mut_ptr(), inner.len());
        // SAFETY: the memory is inner's, which the owner box keeps alive; only the new buffer
        // touches it.
        unsafe { AlignedBuf::from_owner(ptr, len, Box::new((Transfer, inner))) }
    }
    fn upload_async(
        &self,
        dst: &mut CpuTensor,
        offset: usize,
        src: &AlignedBuf,
        src_offset: usize,
        n: usize,
    ) -> Result<Option<Fence>> {
        let data = host_slice(src, dst.dtype(), src_offset, n)?;
        self.cpu.write(dst, offset, data)?;
        if src.owner::<(Transfer, AlignedBuf)>().is_none() {
            return Ok(None);
        }
        self.counts.made.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Fence::new(CountedFence(self.counts.clone()))))
    }
    fn async_uploads(&self) -> bool {
        true
    }
    fn wait_fence(&self, fence: &Fence) -> Result<()> {
        assert!(
            fence.downcast::<CountedFence>().is_some(),
            "a fence of another device"
        );
        self.counts.compute_waits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn gather_rows(&self, table: &CpuTensor, ids: &CpuTensor) -> Result<CpuTensor> {
        self.cpu.gather_rows(table, ids)
    }
    fn add_gathered_rows(
        &self,
        x: &mut CpuTensor,
        table: &CpuTensor,
        ids: &CpuTensor,
    ) -> Result<()> {
        self.cpu.add_gathered_rows(x, table, ids)
    }
    fn layer_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        self.cpu.layer_norm(x, weight, bias, eps)
    }
    fn linear(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        act: Activation,
    ) -> Result<CpuTensor> {
        self.cpu.linear(x, w, bias, act)
    }
    fn add_inplace(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        self.cpu.add_inplace(x, y)
    }
    fn alloc_kv(
        &self,
        batch: usize,
        heads: usize,
        max_len: usize,
        head_dim: usize,
    ) -> Result<CpuTensor> {
        self.cpu.alloc_kv(batch, heads, max_len, head_dim)
    }
    fn append_kv(
        &self,
        k_cache: &mut CpuTensor,
        v_cache: &mut CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        shape: AttnShape,
    ) -> Result<()> {
        self.cpu.append_kv(k_cache, v_cache, k, v, shape)
    }
    fn attention(
        &self,
        q: &CpuTensor,
        k_cache: &CpuTensor,
        v_cache: &CpuTensor,
        mask: &CpuTensor,
        shape: AttnShape,
    ) -> Result<CpuTensor> {
        self.cpu.attention(q, k_cache, v_cache, mask, shape)
    }
    fn attention_with_new(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        k_cache: &CpuTensor,
        v_cache: &CpuTensor,
        mask: &CpuTensor,
        shape: AttnShape,
    ) -> Result<CpuTensor> {
        self.cpu
            .attention_with_new(q, k, v, k_cache, v_cache, mask, shape)
    }
    fn last_rows(&self, x: &CpuTensor, batch: usize, seq: usize) -> Result<CpuTensor> {
        self.cpu.last_rows(x, batch, seq)
    }
    fn sample(&self, logits: &CpuTensor, how: &Sampling<'_>) -> Result<Vec<u32>> {
        self.cpu.sample(logits, how)
    }
}

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<Vec<u32>>,
    new_tokens: Vec<Vec<u32>>,
    max_new_tokens: usize,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn every_async_upload_is_waited_for_before_use() {
    let off = std::env::temp_dir().join(format!("flexbench-fences-{}", std::process::id()));
    std::fs::create_dir_all(&off).unwrap();
    let dir = fixture("odd_f16");
    let exp: Expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let cfg = load_config(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    // weights in host memory; on disk; split over all three tiers (with and without overlap);
    // the cache in host memory, on disk, and split, staged through transfer memory
    // compressed weights (their bytes move as bytes) give the tokens of the same compressed
    // model kept on the compute device
    let compressed_tokens = {
        let dev = CpuDevice::new(CpuOptions::default());
        let mut policy = Policy::new([100, 0, 100, 0, 100, 0]);
        policy.compress_weight = true;
        let model = OffloadModel::load(&dev, &ckpt, &cfg, &policy, None, 0).unwrap();
        let opts = GenOptions::greedy(exp.max_new_tokens);
        let sched = ScheduleOptions {
            num_gpu_batches: 1,
            cpu_attention: false,
            overlap: true,
        };
        generate_offloaded(&dev, &model, &exp.prompts, &opts, &sched)
            .unwrap()
            .new_tokens
    };
    for (percent, overlap, compress) in [
        ([0, 100, 100, 0, 100, 0], true, false),
        ([0, 0, 100, 0, 100, 0], true, false),
        ([30, 30, 100, 0, 100, 0], false, false),
        ([100, 0, 0, 100, 100, 0], true, false),
        ([100, 0, 0, 0, 100, 0], true, false),
        ([0, 50, 0, 50, 0, 100], false, false),
        ([0, 100, 100, 0, 100, 0], true, true),
        ([30, 30, 100, 0, 100, 0], true, true),
    ] {
        let dev = FencingDevice {
            cpu: CpuDevice::new(CpuOptions::default()),
            counts: Arc::new(Counts::default()),
        };
        let mut policy = Policy::new(percent);
        policy.overlap = overlap;
        policy.compress_weight = compress;
        let model = OffloadModel::load(&dev, &ckpt, &cfg, &policy, Some(&off), 0).unwrap();
        let opts = GenOptions {
            max_new_tokens: exp.max_new_tokens,
            sample: SampleMode::Greedy,
            // no early stop: every prefetched unit is used, so every fence reaches compute
            stop_token: None,
            keep_logits: false,
            teacher: None,
        };
        let sched = ScheduleOptions {
            num_gpu_batches: 2,
            cpu_attention: false,
            overlap,
        };
        let out = generate_offloaded(&dev, &model, &exp.prompts, &opts, &sched).unwrap();
        let want = if compress {
            &compressed_tokens
        } else {
            &exp.new_tokens
        };
        assert_eq!(&out.new_tokens, want, "{percent:?} compressed {compress}");
        let c = &dev.counts;
        let made = c.made.load(Ordering::Relaxed);
        assert!(
            made > 0,
            "{percent:?}: no upload went through the transfer memory"
        );
        assert_eq!(
            c.compute_waits.load(Ordering::Relaxed),
            made,
            "{percent:?}: every fence must be waited for by compute"
        );
        if percent[0] + percent[1] < 100 || percent[2] < 100 {
            // disk read buffers and cache staging are reused: each reuse first waits for the
            // copies out of it
            assert!(
                c.host_waits.load(Ordering::Relaxed) > 0,
                "{percent:?}: a transfer buffer was reused without waiting"
            );
        }
    }
    let left: Vec<_> = std::fs::read_dir(&off).unwrap().collect();
    assert!(left.is_empty(), "stray files: {left:?}");
    std::fs::remove_dir_all(&off).ok();
}
