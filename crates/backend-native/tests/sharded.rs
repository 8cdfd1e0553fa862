//! The shared dummy checkpoint in its sharded form (as it is written for models over the shard
//! limit) loads and generates exactly as the single-file form, resident and with every weight
//! on disk.

use std::path::{Path, PathBuf};

use bench_core::checkpoint::{ensure_dummy_checkpoint, ensure_dummy_checkpoint_in_shards};
use bench_core::dummy::DEFAULT_SEED;

fn generate(dir: &Path, extra: &[&str], tag: &str) -> serde_json::Value {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let input = tmp.join(format!("sharded-{tag}-{}.json", std::process::id()));
    std::fs::write(
        &input,
        br#"{"prompts": [[5, 6, 7, 8], [9, 10, 11]], "max_new_tokens": 6}"#,
    )
    .unwrap();
    let offload = tmp.join(format!("sharded-offload-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&offload).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flexbench-native"))
        .args(["generate", "--json", "--model"])
        .arg(dir)
        .arg("--input")
        .arg(&input)
        .arg("--offload-dir")
        .arg(&offload)
        .args(extra)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&offload);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn sharded_and_single_file_checkpoints_generate_the_same_tokens() {
    let cache =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sharded-{}", std::process::id()));
    let cfg = bench_core::model::lookup("opt-tiny-odd").unwrap();
    let single = ensure_dummy_checkpoint(&cache.join("one"), &cfg, DEFAULT_SEED).unwrap();
    let sharded =
        ensure_dummy_checkpoint_in_shards(&cache.join("many"), &cfg, DEFAULT_SEED, 60_000).unwrap();
    assert!(sharded.join("model.safetensors.index.json").is_file());
    let on_disk = ["--percent", "0", "0", "100", "0", "100", "0"];
    for (extra, tag) in [(&[][..], "resident"), (&on_disk[..], "disk")] {
        let a = generate(&single, extra, &format!("one-{tag}"));
        let b = generate(&sharded, extra, &format!("many-{tag}"));
        assert_eq!(a["new_tokens"], b["new_tokens"], "{tag}");
        assert!(
            a["new_tokens"].as_array().is_some_and(|t| t.len() == 2),
            "{a}"
        );
    }
    std::fs::remove_dir_all(&cache).unwrap();
}
