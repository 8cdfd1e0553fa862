//! The attention half of a layer for one GPU batch under offloading: the cache segment on the
//! compute device runs there; host and disk segments run on the host (with CPU attention) or on
//! copies uploaded for this step, and their new keys and values go back to their tier.

use std::sync::Arc;

use anyhow::{Context, Result};

use super::cache_io::Loaded;
use super::hidden::upload_act;
use super::run::Run;
use crate::device::cpu::CpuTensor;
use crate::device::{AttnShape, Device, DeviceTensor, HostSlice};
use crate::model::layers;
use crate::offload::placement::Tier;
use crate::offload::stats::{Link, Stats};

impl<'a, D: Device> Run<'a, D> {
    /// The attention half of layer `l` for GPU batch `k`, each cache segment where it lives.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        &mut self,
        l: usize,
        k: usize,
        w: &crate::model::AttnWeights<Arc<D::Tensor>>,
        x: &mut D::Tensor,
        mask: &(Vec<u32>, D::Tensor),
        shape: AttnShape,
        mut loaded: Loaded<D::Tensor>,
    ) -> Result<()> {
        let dev = self.dev;
        let cfg = &self.model.cfg;
        let cache = &self.caches[l][k];
        let (q, kk, vv) = layers::attn_qkv(dev, cfg, w, x)?;
        if cache.all_compute() {
            let mut g = cache.compute.lock().expect("cache lock");
            let (kc, vc) = g.as_mut().context("compute cache segment missing")?;
            dev.append_kv(kc, vc, &kk, &vv, shape)?;
            let a = dev.attention_with_new(&q, &kk, &vv, kc, vc, &mask.1, shape)?;
            return layers::attn_out(dev, cfg, w, x, &a);
        }
        let single = cache.segments.len() == 1;
        let (new, total) = (shape.new_len, shape.total_len());
        let mut parts = Vec::with_capacity(cache.segments.len());
        for seg in cache.segments.clone() {
            let sh = AttnShape::new(seg.len, shape.heads, shape.head_dim, shape.past_len, new)
                .with_sparsity(shape.sparsity());
            let rows = (seg.start * new, seg.len * new);
            let (qs, ks, vs) = if single {
                (None, None, None)
            } else {
                (
                    Some(slice_rows(dev, self.stats, &q, rows.0, rows.1)?),
                    Some(slice_rows(dev, self.stats, &kk, rows.0, rows.1)?),
                    Some(slice_rows(dev, self.stats, &vv, rows.0, rows.1)?),
                )
            };
            let (qs, ks, vs) = (
                qs.as_ref().unwrap_or(&q),
                ks.as_ref().unwrap_or(&kk),
                vs.as_ref().unwrap_or(&vv),
            );
            let m = &mask.0[seg.start * total..(seg.start + seg.len) * total];
            let a = match seg.tier {
                Tier::Compute => {
                    let mask_t = dev.upload(HostSlice::U32(m), &[seg.len, total])?;
                    let mut g = cache.compute.lock().expect("cache lock");
                    let (kc, vc) = g.as_mut().context("compute cache segment missing")?;
                    dev.append_kv(kc, vc, ks, vs, sh)?;
                    dev.attention_with_new(qs, ks, vs, kc, vc, &mask_t, sh)?
                }
                tier if self.sched.cpu_attention => {
                    // only q, the new k and v, and the result cross the link
                    let qh = self.to_host(qs)?;
                    let kh = self.to_host(ks)?;
                    let vh = self.to_host(vs)?;
                    let mask_h = self.host_dev.upload(HostSlice::U32(m), &[seg.len, total])?;
                    let a = if tier == Tier::Host {
                        let mut g = cache.host.lock().expect("cache lock");
                        let (hk, hv) = g.as_mut().context("host cache segment missing")?;
                        self.host_dev.append_kv(hk, hv, &kh, &vh, sh)?;
                        self.host_dev
                            .attention_with_new(&qh, &kh, &vh, hk, hv, &mask_h, sh)?
                    } else {
                        let (mut dk, mut dv) = loaded
                            .disk_host
                            .take()
                            .context("disk cache segment was not loaded")?;
                        self.host_dev.append_kv(&mut dk, &mut dv, &kh, &vh, sh)?;
                        let a = self
                            .host_dev
                            .attention_with_new(&qh, &kh, &vh, &dk, &dv, &mask_h, sh)?;
                        self.store_disk(l, k, kh, vh, shape.past_len, new);
                        a
                    };
                    let r = upload_act(dev, a.f32()?, a.shape())?;
                    self.stats.moved(Link::HostToCompute, r.size_bytes());
                    r
                }
                tier => {
                    let mask_t = dev.upload(HostSlice::U32(m), &[seg.len, total])?;
                    let (mut wk, mut wv) = if tier == Tier::Host {
                        loaded
                            .host
                            .take()
                            .context("host cache segment was not loaded")?
                    } else {
                        loaded
                            .disk
                            .take()
                            .context("disk cache segment was not loaded")?
                    };
                    dev.append_kv(&mut wk, &mut wv, ks, vs, sh)?;
                    let a = dev.attention_with_new(qs, ks, vs, &wk, &wv, &mask_t, sh)?;
                    // the new keys and values go back to their tier
                    let kh = self.to_host(ks)?;
                    let vh = self.to_host(vs)?;
                    if tier == Tier::Host {
                        let mut g = cache.host.lock().expect("cache lock");
                        let (hk, hv) = g.as_mut().context("host cache segment missing")?;
                        self.host_dev.append_kv(hk, hv, &kh, &vh, sh)?;
                    } else {
                        self.store_disk(l, k, kh, vh, shape.past_len, new);
                    }
                    a
                }
            };
            parts.push(a);
        }
        let a = if single {
            parts.pop().context("no cache segment")?
        } else {
            concat_rows(dev, self.stats, &parts)?
        };
        layers::attn_out(dev, cfg, w, x, &a)
    }

    /// A compute tensor's values as an f32 host tensor (counted on the compute -> host link).
    fn to_host(&self, t: &D::Tensor) -> Result<CpuTensor> {
        let v = self.dev.download_f32(t)?;
        self.stats.moved(Link::ComputeToHost, t.size_bytes());
        CpuTensor::from_f32(t.shape(), v)
    }
}

/// Rows `start .. start + n` of a 2-D activation tensor. Through the host: the device trait has
/// no device-side copy yet (a CUDA device would do it in place); only split caches need it.
/// Both crossings are counted on their links.
fn slice_rows<D: Device>(
    dev: &D,
    stats: &Stats,
    t: &D::Tensor,
    start: usize,
    n: usize,
) -> Result<D::Tensor> {
    let w = t.shape()[1];
    let v = dev.download_f32(t)?;
    stats.moved(Link::ComputeToHost, t.size_bytes());
    let r = upload_act(dev, &v[start * w..(start + n) * w], &[n, w])?;
    stats.moved(Link::HostToCompute, r.size_bytes());
    Ok(r)
}

/// The rows of `parts` stacked.
///
/// Through host memory like [`slice_rows`], and counted likewise.
fn concat_rows<D: Device>(dev: &D, stats: &Stats, parts: &[D::Tensor]) -> Result<D::Tensor> {
    let w = parts[0].shape()[1];
    let mut all = Vec::new();
    for p in parts {
        all.extend(dev.download_f32(p)?);
        stats.moved(Link::ComputeToHost, p.size_bytes());
    }
    let rows = all.len() / w;
    let r = upload_act(dev, &all, &[rows, w])?;
    stats.moved(Link::HostToCompute, r.size_bytes());
    Ok(r)
}
