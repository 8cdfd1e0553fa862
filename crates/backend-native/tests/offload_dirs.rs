//! Bad offload directories: missing, read-only or too full for the placement. Each gives a clear
//! error before generation starts (exit code 1 from the runner, no panic) and leaves no files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backend_native::device::cpu::CpuDevice;
use backend_native::model::{load_config, Checkpoint};
use backend_native::offload::direct::free_bytes;
use backend_native::schedule::OffloadModel;
use bench_core::Policy;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/odd_f16")
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flexbench-dirs-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// `generate` with weights and cache on disk in `dir`.
fn generate_on_disk(dir: &Path) -> Output {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let input =
        std::env::temp_dir().join(format!("flexbench-dirs-{}-{n}.json", std::process::id()));
    std::fs::write(
        &input,
        r#"{"prompts": [[5, 6, 7], [9]], "max_new_tokens": 3}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flexbench-native"))
        .args([
            "generate",
            "--json",
            "--percent",
            "0",
            "0",
            "0",
            "0",
            "100",
            "0",
            "--model",
        ])
        .arg(fixture())
        .arg("--input")
        .arg(&input)
        .arg("--offload-dir")
        .arg(dir)
        .output()
        .unwrap();
    std::fs::remove_file(&input).ok();
    out
}

fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "no tokens before the error");
}

#[test]
fn missing_directory() {
    let dir = std::env::temp_dir().join(format!("flexbench-missing-{}", std::process::id()));
    let out = generate_on_disk(&dir);
    assert_clean_failure(&out, "does not exist");
    assert!(!dir.exists(), "nothing created");
}

#[test]
fn directory_is_a_file() {
    let f = std::env::temp_dir().join(format!("flexbench-file-{}", std::process::id()));
    std::fs::write(&f, "x").unwrap();
    let out = generate_on_disk(&f);
    assert_clean_failure(&out, "not a directory");
    std::fs::remove_file(&f).unwrap();
}

/// A read-only directory: permission bits for ordinary users; root ignores those, so as root
/// the test mounts a read-only tmpfs.
#[test]
fn read_only_directory() {
    let dir = scratch("ro");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mounted = if root {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: running as root without the right to mount a read-only tmpfs");
            std::fs::remove_dir(&dir).ok();
            return;
        }
        true
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        false
    };
    let out = generate_on_disk(&dir);
    let listing = entries(&dir);
    if mounted {
        Command::new("umount").arg(&dir).status().unwrap();
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::remove_dir(&dir).ok();
    assert_clean_failure(&out, "read-only");
    assert!(listing.is_empty(), "stray files: {listing:?}");
}

/// Too little free space for what the placement puts on disk: refused before any file is
/// written. The need is the real filesystem's free space plus 1 GiB.
#[test]
fn full_directory() {
    let dir = scratch("full");
    let cfg = load_config(&fixture()).unwrap();
    let ckpt = Checkpoint::open(&fixture()).unwrap();
    let dev = CpuDevice::default();
    let policy = Policy::new([0, 0, 0, 0, 100, 0]);
    let cache_need = free_bytes(&dir).unwrap() + (1 << 30);
    let err = OffloadModel::load(&dev, &ckpt, &cfg, &policy, Some(&dir), cache_need)
        .err()
        .expect("a full offload directory is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("free") && msg.contains(&dir.display().to_string()),
        "{msg}"
    );
    assert!(entries(&dir).is_empty(), "stray files: {:?}", entries(&dir));
    std::fs::remove_dir(&dir).unwrap();
}

/// A real filesystem too small for the placement (a 64 KiB tmpfs, mounted as root): refused up
/// front by its free space, nothing written.
#[test]
fn tiny_filesystem_is_refused_up_front() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let dir = scratch("enospc");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: no right to mount a tmpfs");
        std::fs::remove_dir(&dir).ok();
        return;
    }
    // the fixture's weights and cache need more than 64 KiB once padded to 4 KiB per tensor
    let out = generate_on_disk(&dir);
    let listing = entries(&dir);
    Command::new("umount").arg(&dir).status().unwrap();
    std::fs::remove_dir(&dir).ok();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    eprintln!("{stderr}");
    assert!(
        stderr.contains("full") || stderr.contains("free"),
        "{stderr}"
    );
    assert!(listing.is_empty(), "stray files: {listing:?}");
}
