//! Whether this machine has an NVIDIA GPU, answered without importing torch (seconds) or loading
//! CUDA: the driver's device node, else `nvidia-smi -L`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// True when an NVIDIA GPU is visible. Cached for the process.
pub fn nvidia_gpu_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        Path::new("/dev/nvidia0").exists()
            || Command::new("nvidia-smi")
                .arg("-L")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .output()
                .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GPU"))
                .unwrap_or(false)
    })
}

/// `check_case`'s answer for a case's device.
pub fn check_device(device: bench_core::Device) -> Result<(), String> {
    match device {
        bench_core::Device::Cpu => Ok(()),
        bench_core::Device::Cuda if nvidia_gpu_present() => Ok(()),
        bench_core::Device::Cuda => Err(
            "no CUDA GPU here (no /dev/nvidia0, nvidia-smi finds none); run device cpu cases"
                .into(),
        ),
    }
}
