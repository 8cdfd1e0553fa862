//! [`Fetched`]: a unit's tensors on the compute device, with the copies into them still in flight
//! and typed views for the layer math; dropping it returns its buffers to the compute pool.

use std::sync::Arc;

use anyhow::Result;

use super::pool::{ComputePool, PoolKey};
use crate::device::{Device, Fence};
use crate::model::weights::{AttnWeights, LayerWeights, MlpWeights};
use crate::offload::stats::MemGuard;

/// A unit's tensors on the compute device (stage two of a fetch), in the unit's order.
pub struct Fetched<T> {
    pub tensors: Vec<Arc<T>>,
    /// Copies still in flight into `tensors` ([`Fetched::ready`] orders compute behind them).
    pub(super) fences: Vec<Fence>,
    /// Which tensors are copies from the compute pool (returned to it on drop) and their
    /// memory accounting.
    pub(super) copies: Vec<Option<(PoolKey, MemGuard)>>,
    pub(super) pool: Arc<ComputePool<T>>,
}

impl<T> Drop for Fetched<T> {
    fn drop(&mut self) {
        // a unit dropped unused (a prefetch past an early stop, an error) may still be the
        // target of copies: they must end before its buffers are reused or freed
        for f in self.fences.drain(..) {
            let _ = f.wait_host();
        }
        let Ok(mut pool) = self.pool.0.lock() else {
            return;
        };
        for (t, c) in self.tensors.drain(..).zip(self.copies.drain(..)) {
            if let Some((key, g)) = c {
                // still shared (a caller kept a clone): let it go instead
                if let Ok(t) = Arc::try_unwrap(t) {
                    pool.entry(key).or_default().push((t, g));
                }
            }
        }
    }
}

/// Typed views of a fetched unit.
impl<T> Fetched<T> {
    /// Orders the compute queued from now on behind the copies into these tensors (call it on
    /// the compute thread before the first op that reads them).
    pub fn ready<D: Device<Tensor = T>>(&mut self, dev: &D) -> Result<()> {
        for f in self.fences.drain(..) {
            dev.wait_fence(&f)?;
        }
        Ok(())
    }

    /// A whole decoder layer's weights (a layer unit without `sep_layer`).
    pub fn layer(&self) -> LayerWeights<Arc<T>> {
        LayerWeights::from_tensors(&mut self.tensors.iter().cloned())
            .expect("a layer unit holds 16 tensors")
    }

    /// An attention half's weights (an attention unit with `sep_layer`).
    pub fn attn(&self) -> AttnWeights<Arc<T>> {
        AttnWeights::from_tensors(&mut self.tensors.iter().cloned())
            .expect("an attention unit holds its 10 tensors")
    }

    /// An MLP half's weights (an MLP unit with `sep_layer`).
    pub fn mlp(&self) -> MlpWeights<Arc<T>> {
        MlpWeights::from_tensors(&mut self.tensors.iter().cloned())
            .expect("an MLP unit holds its 6 tensors")
    }
}
