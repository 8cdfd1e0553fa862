//! Launching the kernels of `kernels/` on the compute stream: the grid shapes the ops use, and
//! `launch!`, the one place that looks a kernel up, passes its arguments and turns a driver
//! error into one that names the kernel.

use cudarc::driver::LaunchConfig;

use super::device::CudaDevice;

impl CudaDevice {
    /// Blocks for a grid-stride elementwise kernel over n elements: enough to fill the GPU.
    pub(super) fn grid_stride(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, self.sm_count * 8);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// One block of `threads` per row (at least one block).
pub(super) fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches kernel `$name` of device `$dev` on its compute stream with launch configuration
/// `$cfg` and the kernel arguments in order (references to plain values: device addresses as
/// `u64`, sizes and scalars); evaluates to a `Result<()>` whose error names the kernel.
///
/// The launch is unsafe and the macro does not hide that: it expands to an unsafe call, so it
/// must stand inside an `unsafe` block whose SAFETY comment says why the arguments match the
/// kernel's signature and the buffers hold what the kernel reads and writes.
macro_rules! launch {
    ($dev:expr, $name:literal, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let dev: &$crate::device::cuda::device::CudaDevice = $dev;
        let f = dev.kernels.get($name)?;
        let mut args = dev.stream.launch_builder(f);
        $(::cudarc::driver::PushKernelArg::arg(&mut args, $arg);)+
        args.launch($cfg)
            .map(drop)
            .map_err(|e| $crate::device::cuda::device::drv(e, $name))
    }};
}
pub(super) use launch;
