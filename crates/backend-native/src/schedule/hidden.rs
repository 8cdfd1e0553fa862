//! Hidden states between layers on the activation tier: kept on the compute device, in host
//! memory, or in each GPU batch's activation file, and brought back to the compute device for the
//! next layer.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::run::Run;
use crate::device::{DType, Device, DeviceTensor, HostSlice};
use crate::offload::direct::{align_up, AlignedBuf};
use crate::offload::placement::Tier;
use crate::offload::stats::{Link, MemGuard};

/// A GPU batch's hidden states between layers, on the activation tier.
pub(super) enum Hidden<T> {
    Compute(T),
    Host(Vec<f32>, Vec<usize>, MemGuard),
    /// In the batch's activation file (f32 values from offset 0), of this shape.
    Disk(Vec<usize>),
    Empty,
}

impl<'a, D: Device> Run<'a, D> {
    /// Hidden states to the activation tier.
    pub(super) fn put_hidden(&self, k: usize, x: D::Tensor) -> Result<Hidden<D::Tensor>> {
        if self.act_tier == Tier::Compute {
            return Ok(Hidden::Compute(x));
        }
        let shape = x.shape().to_vec();
        let v = self.dev.download_f32(&x)?;
        self.stats.moved(Link::ComputeToHost, x.size_bytes());
        if self.act_tier == Tier::Host {
            let g = MemGuard::new(self.stats, Tier::Host, v.len() * 4);
            return Ok(Hidden::Host(v, shape, g));
        }
        let file = &self.act_files[k];
        let len = align_up(v.len() * 4);
        let mut buf = AlignedBuf::new(len)?;
        buf.f32s_mut(0, v.len()).copy_from_slice(&v);
        let t = Instant::now();
        file.write_at(&buf, len, 0)
            .context("writing hidden states to the offload directory")?;
        self.stats.add_disk_busy(t.elapsed().as_secs_f64());
        self.stats.moved(Link::DiskWrite, len);
        Ok(Hidden::Disk(shape))
    }

    /// Hidden states back on the compute device.
    pub(super) fn take_hidden(&self, k: usize, h: &mut Hidden<D::Tensor>) -> Result<D::Tensor> {
        let (v, shape) = match std::mem::replace(h, Hidden::Empty) {
            Hidden::Compute(x) => return Ok(x),
            Hidden::Host(v, shape, _g) => (v, shape),
            Hidden::Disk(shape) => {
                let n: usize = shape.iter().product();
                let len = align_up(n * 4);
                let mut buf = AlignedBuf::new(len)?;
                let t = Instant::now();
                self.act_files[k]
                    .read_at(&mut buf, len, 0)
                    .context("reading hidden states from the offload directory")?;
                self.stats.add_disk_busy(t.elapsed().as_secs_f64());
                self.stats.moved(Link::DiskRead, len);
                (buf.f32s(0, n).to_vec(), shape)
            }
            Hidden::Empty => bail!("hidden states taken twice"),
        };
        let t = upload_act(self.dev, &v, &shape)?;
        self.stats.moved(Link::HostToCompute, t.size_bytes());
        Ok(t)
    }
}

/// f32 host values to a compute tensor in the device's activation dtype.
pub(super) fn upload_act<D: Device>(dev: &D, v: &[f32], shape: &[usize]) -> Result<D::Tensor> {
    match dev.act_dtype() {
        DType::F32 => dev.upload(HostSlice::F32(v), shape),
        DType::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            dev.upload(HostSlice::F16(&h), shape)
        }
        d => bail!("{d:?} activations"),
    }
}
