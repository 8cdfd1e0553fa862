//! Bad input to compression and sparse attention gives a clear error naming what to change,
//! never a panic: a model whose shapes groups of 64 do not fit, an attention sparsity outside
//! (0, 1], and an offload file whose compressed bytes were damaged during the run.

use std::path::{Path, PathBuf};

use backend_native::device::cpu::{CpuDevice, CpuOptions};
use backend_native::generate::GenOptions;
use backend_native::model::{load_config, Checkpoint, DummySource};
use backend_native::schedule::{generate_offloaded, OffloadModel, ScheduleOptions};
use bench_core::Policy;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flexbench-q4-bad-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `flexbench-native generate` on the odd_f16 fixture with `extra` flags: its exit code 1 and
/// stderr.
fn generate_fails(extra: &[&str]) -> String {
    let input = std::env::temp_dir().join(format!(
        "flexbench-q4-bad-prompts-{}-{}.json",
        std::process::id(),
        extra.join("_").replace(['/', ' '], "")
    ));
    std::fs::write(
        &input,
        br#"{"prompts": [[5, 6, 7], [8, 9]], "max_new_tokens": 3}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flexbench-native"))
        .args(["generate", "--model"])
        .arg(fixture("odd_f16"))
        .arg("--input")
        .arg(&input)
        .args(extra)
        .output()
        .unwrap();
    std::fs::remove_file(&input).ok();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn shapes_too_small_for_groups_of_64_name_the_flag_to_turn_off() {
    // hidden 16: every linear's dimension 0 fills 16 of a group's 64 values
    let mut cfg = bench_core::model::lookup("opt-tiny").unwrap();
    cfg.hidden_size = 16;
    cfg.ffn_dim = 32;
    cfg.num_attention_heads = 2;
    cfg.word_embed_proj_dim = 16;
    let src = DummySource::new(&cfg, 3);
    let dev = CpuDevice::new(CpuOptions::default());
    let mut p = Policy::new([100, 0, 100, 0, 100, 0]);
    p.compress_weight = true;
    let e = match OffloadModel::load(&dev, &src, &cfg, &p, None, 0) {
        Ok(_) => panic!("a hidden size of 16 was compressed"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("cannot be grouped") && e.contains("compress_weight") && e.contains("[16, 16]"),
        "{e}"
    );
    // the golden fixture's head_dim of 8, through the command line
    let e = generate_fails(&["--compress-cache"]);
    assert!(
        e.contains("head_dim of 8") && e.contains("--compress-cache"),
        "{e}"
    );
}

#[test]
fn a_sparsity_outside_zero_to_one_names_the_flag() {
    for s in ["0", "1.5", "-0.1", "NaN"] {
        let e = generate_fails(&[&format!("--attn-sparsity={s}")]);
        assert!(
            e.contains("--attn-sparsity") && e.contains("(0, 1]"),
            "{s}: {e}"
        );
    }
    // a suite's or case's policy says it too
    let mut p = Policy::new([100, 0, 100, 0, 100, 0]);
    p.attn_sparsity = 0.0;
    assert!(p
        .validate()
        .unwrap_err()
        .contains("attn_sparsity must be in (0, 1]"));
}

/// Overwrites every weight file of `model`'s offload directory with `byte`, keeping its length.
fn damage(model: &OffloadModel<backend_native::device::cpu::CpuTensor>, byte: u8) -> usize {
    let dir = model.offload_dir().expect("weights on disk");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("weights-")
        {
            let len = std::fs::metadata(&p).unwrap().len() as usize;
            std::fs::write(&p, vec![byte; len]).unwrap();
            n += 1;
        }
    }
    n
}

#[test]
fn a_damaged_compressed_offload_file_is_a_clear_error() {
    let dir = fixture("odd_f16");
    let cfg = load_config(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let dev = CpuDevice::new(CpuOptions::default());
    let off = scratch("damaged");
    let mut p = Policy::new([0, 0, 100, 0, 100, 0]);
    p.compress_weight = true;
    let opts = GenOptions::greedy(2);
    let sched = ScheduleOptions {
        num_gpu_batches: 1,
        cpu_attention: false,
        overlap: true,
    };
    let prompts = vec![vec![5, 6, 7]];
    let model = OffloadModel::load(&dev, &ckpt, &cfg, &p, Some(&off), 0).unwrap();
    // sound files first: the check does not refuse what the quantizer wrote
    generate_offloaded(&dev, &model, &prompts, &opts, &sched).unwrap();
    // 0xFF bytes: every scale and min becomes NaN
    assert!(damage(&model, 0xFF) > 0);
    let e = format!(
        "{:#}",
        generate_offloaded(&dev, &model, &prompts, &opts, &sched).unwrap_err()
    );
    assert!(
        e.contains("is corrupt") && e.contains("weights-") && e.contains("--offload-dir"),
        "{e}"
    );
    // the two-stage fetch (read into a host buffer, then upload: the CUDA device's path)
    // checks the same
    let w = &model.weights;
    let unit = (0..w.num_units()).find(|&u| w.has_disk(u)).unwrap();
    let read = w.read_disk(&dev, unit).unwrap();
    let e = format!("{:#}", w.materialize(&dev, unit, Some(read)).err().unwrap());
    assert!(e.contains("is corrupt"), "{e}");
    // zero bytes: scales of 0, which no quantizer writes either
    damage(&model, 0);
    let e = format!(
        "{:#}",
        generate_offloaded(&dev, &model, &prompts, &opts, &sched).unwrap_err()
    );
    assert!(e.contains("impossible scale"), "{e}");
    drop(model);
    std::fs::remove_dir_all(&off).ok();
}
