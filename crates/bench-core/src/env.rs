//! The environment a run happened in, captured once per `bench` run and written to
//! `<out>/<suite>/env-<timestamp>.json`; each record names it by `env_id` (the file's stem).
//!
//! Every probe is best effort: what cannot be read is recorded as absent, never an error, so a
//! benchmark never fails for want of `nvidia-smi` or `git`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::record::time;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    /// `env-<timestamp>`: the file stem and the records' `env_id`.
    pub id: String,
    pub captured_at: String,
    pub git_commit: Option<String>,
    /// Uncommitted changes to tracked files.
    pub git_dirty: Option<bool>,
    pub rustc: Option<String>,
    pub os: Option<String>,
    pub kernel: Option<String>,
    pub hostname: Option<String>,
    pub cpu_model: Option<String>,
    /// Logical CPUs this process may use.
    pub cpu_cores: Option<usize>,
    pub ram_bytes: Option<u64>,
    /// Where offloaded tensors go (the per-case work directories' parent).
    pub offload_dir: String,
    pub offload_fs: Option<String>,
    pub offload_free_bytes: Option<u64>,
    /// One line per GPU from nvidia-smi: name, memory, driver.
    pub gpus: Vec<String>,
    /// Backends used by this run: name -> "available" or why not, and any versions they report.
    pub backends: BTreeMap<String, String>,
    pub versions: BTreeMap<String, String>,
}

/// Captures the environment. `project_root` is where git runs; `offload_dir` must exist.
pub fn capture(project_root: &Path, offload_dir: &Path, now: SystemTime) -> Environment {
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let os = os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let ram_bytes = ram_bytes();
    let (offload_fs, offload_free_bytes) = filesystem(offload_dir);
    let gpus = output(
        Command::new("nvidia-smi")
            .arg("--query-gpu=name,memory.total,driver_version")
            .arg("--format=csv,noheader"),
    )
    .map(|s| {
        s.lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    })
    .unwrap_or_default();
    Environment {
        id: format!("env-{}", time::stamp(now)),
        captured_at: time::rfc3339(now),
        git_commit: output(
            Command::new("git")
                .arg("-C")
                .arg(project_root)
                .args(["rev-parse", "HEAD"]),
        ),
        git_dirty: Command::new("git")
            .arg("-C")
            .arg(project_root)
            .args(["status", "--porcelain", "--untracked-files=no"])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| !o.stdout.trim_ascii().is_empty()),
        rustc: output(Command::new("rustc").arg("--version")),
        os,
        kernel: output(Command::new("uname").args(["-sr"])),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_string()),
        cpu_model,
        cpu_cores: std::thread::available_parallelism().ok().map(|n| n.get()),
        ram_bytes,
        offload_dir: offload_dir.display().to_string(),
        offload_fs,
        offload_free_bytes,
        gpus,
        backends: BTreeMap::new(),
        versions: BTreeMap::new(),
    }
}

impl Environment {
    /// Writes `<dir>/<id>.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(format!("{}.json", self.id));
        let text = serde_json::to_string_pretty(self).expect("environment always serializes");
        std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

/// Trimmed stdout of a successful command; `None` if it failed, is missing, or printed nothing.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(std::process::Stdio::null()).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// Filesystem type and free bytes of the filesystem holding `dir` (statfs + /proc/mounts).
fn filesystem(dir: &Path) -> (Option<String>, Option<u64>) {
    let free = statvfs_free(dir);
    let canon = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    // The longest mount point that is a prefix of the directory holds it.
    let fs = std::fs::read_to_string("/proc/mounts").ok().and_then(|m| {
        m.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (_dev, mnt, fstype) = (f.next()?, f.next()?, f.next()?);
                canon
                    .starts_with(mnt)
                    .then(|| (mnt.len(), fstype.to_string()))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, t)| t)
    });
    (fs, free)
}

/// Bytes free to an unprivileged writer on the filesystem holding `dir` (or its nearest
/// existing ancestor); `None` if it cannot be read.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|d| d.exists())?;
    statvfs_free(existing)
}

/// Total RAM of this machine (MemTotal).
pub fn ram_bytes() -> Option<u64> {
    meminfo("MemTotal:")
}

/// RAM available to a new process without swapping (MemAvailable).
pub fn available_ram_bytes() -> Option<u64> {
    meminfo("MemAvailable:")
}

fn meminfo(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    })
}

/// Free memory of GPU 0 as nvidia-smi reports it, bytes; `None` without a GPU.
pub fn free_gpu_bytes() -> Option<u64> {
    if !nvidia_gpu_present() {
        return None;
    }
    let text = output(
        Command::new("nvidia-smi")
            .args(["--query-gpu=memory.free", "--format=csv,noheader,nounits"])
            .arg("--id=0"),
    )?;
    let mib: u64 = text.lines().next()?.trim().parse().ok()?;
    Some(mib << 20)
}

/// What identifies this machine for a cached measurement of it (a machine profile): the CPU
/// model and count, the RAM, the GPUs, the host name and the filesystem of `offload_dir`. A
/// 16-hex-digit hash; a machine whose hardware changes gets a new one.
pub fn machine_fingerprint(offload_dir: &Path) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .unwrap_or("");
    let gpus = output(
        Command::new("nvidia-smi")
            .arg("--query-gpu=name,memory.total")
            .arg("--format=csv,noheader"),
    )
    .unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let key = format!(
        "{cpu}|{:?}|{:?}|{gpus}|{}|{:?}",
        std::thread::available_parallelism().ok().map(|n| n.get()),
        ram_bytes().map(|b| b >> 30),
        host.trim(),
        filesystem(offload_dir).0
    );
    format!("{:016x}", crate::hash::fnv1a64(key.as_bytes()))
}

fn statvfs_free(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// True when an NVIDIA GPU is visible, answered without importing torch (seconds) or loading
/// CUDA: the driver's device node, else `nvidia-smi -L`. Cached for the process.
pub fn nvidia_gpu_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| {
        Path::new("/dev/nvidia0").exists()
            || Command::new("nvidia-smi")
                .arg("-L")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .output()
                .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GPU"))
                .unwrap_or(false)
    })
}

/// `Backend::check_case`'s answer for a case's device, for runners that need nothing more than
/// a visible GPU for `cuda` cases.
pub fn check_device(device: crate::case::Device) -> Result<(), String> {
    match device {
        crate::case::Device::Cpu => Ok(()),
        crate::case::Device::Cuda if nvidia_gpu_present() => Ok(()),
        crate::case::Device::Cuda => Err(
            "no CUDA GPU here (no /dev/nvidia0, nvidia-smi finds none); run device cpu cases"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_this_machine() {
        let dir = std::env::temp_dir();
        let e = capture(
            Path::new(env!("CARGO_MANIFEST_DIR")),
            &dir,
            SystemTime::now(),
        );
        assert!(e.id.starts_with("env-"));
        assert!(e.cpu_cores.unwrap() >= 1);
        assert!(e.ram_bytes.unwrap() > 0);
        assert!(e.offload_free_bytes.is_some());
        assert!(e.offload_fs.is_some());
        assert!(e.kernel.as_deref().unwrap_or("").contains("Linux"));
    }
}
