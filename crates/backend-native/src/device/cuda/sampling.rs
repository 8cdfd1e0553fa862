//! The next token on the CUDA device: the arg max or a temperature draw per row of logits (the
//! same rules as the CPU device's [`crate::device::cpu::sampling`], so both draw the same
//! tokens), and the softmax itself for callers that want the distribution.

use anyhow::{ensure, Result};

use super::device::CudaDevice;
use super::launch::{launch, rows_cfg};
use super::tensor::{check_2d, CudaTensor};
use super::transfer::{download_u32, upload};
use crate::device::{DType, HostSlice, Sampling};

impl CudaDevice {
    /// Row softmax of `logits / temperature` into f32 probabilities (for tests and for callers
    /// that want the distribution itself).
    pub fn softmax(&self, logits: &CudaTensor, temperature: f32) -> Result<CudaTensor> {
        let mut tmp = None;
        let x = self.as_f16(logits, &mut tmp)?;
        let (rows, cols) = check_2d(x, "softmax")?;
        let mut out = self.alloc(DType::F32, &[rows, cols])?;
        let (op, xp) = (self.ptr_mut(&mut out), self.ptr(x));
        let (r, c) = (rows as i32, cols as i32);
        // SAFETY: out is [rows, cols] f32, x [rows, cols] f16.
        unsafe {
            launch!(
                self,
                "softmax_f16_f32",
                rows_cfg(rows, 1024),
                &op,
                &xp,
                &r,
                &c,
                &temperature
            )
        }?;
        Ok(out)
    }
}

pub(super) fn sample(
    dev: &CudaDevice,
    logits: &CudaTensor,
    how: &Sampling<'_>,
) -> Result<Vec<u32>> {
    let mut tmp = None;
    let x = dev.as_f16(logits, &mut tmp)?;
    let (rows, cols) = check_2d(x, "sample")?;
    let mut ids = dev.alloc(DType::U32, &[rows])?;
    let (ip, xp) = (dev.ptr_mut(&mut ids), dev.ptr(x));
    let (r, c) = (rows as i32, cols as i32);
    match how {
        Sampling::Greedy => {
            // SAFETY: ids holds rows u32, x is [rows, cols].
            unsafe { launch!(dev, "argmax_f16", rows_cfg(rows, 1024), &ip, &xp, &r, &c) }?;
        }
        Sampling::Temperature {
            temperature,
            uniforms,
        } => {
            ensure!(
                uniforms.len() == rows,
                "sample: {} uniforms for {rows} rows",
                uniforms.len()
            );
            ensure!(
                *temperature > 0.0 && temperature.is_finite(),
                "sample: temperature must be > 0, got {temperature}"
            );
            let u = upload(dev, HostSlice::F32(uniforms), &[rows])?;
            let up = dev.ptr(&u);
            // SAFETY: as above; u holds rows floats.
            unsafe {
                launch!(
                    dev,
                    "sample_temperature_f16",
                    rows_cfg(rows, 1024),
                    &ip,
                    &xp,
                    &up,
                    &r,
                    &c,
                    temperature
                )
            }?;
        }
    }
    download_u32(dev, &ids)
}
