//! Bad checkpoints and prompts give clear errors that name the file or tensor, never a panic.

use std::path::{Path, PathBuf};

use backend_native::device::cpu::CpuOptions;
use backend_native::generate::{generate, GenOptions, SampleMode};
use backend_native::runner::{load_cpu_model, open_checkpoint};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A scratch copy of a fixture directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(name: &str, tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("flexbench-bad-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(fixture(name)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        Scratch(dir)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn err_of(dir: &Path) -> String {
    match open_checkpoint(dir) {
        Ok(_) => panic!("{} opened although it is broken", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn missing_directory_and_config() {
    let e = err_of(Path::new("/nonexistent/flexbench-ckpt"));
    assert!(e.contains("/nonexistent/flexbench-ckpt"), "{e}");
    let s = Scratch::copy_of("odd_f16", "noconfig");
    std::fs::remove_file(s.path("config.json")).unwrap();
    let e = err_of(&s.0);
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn missing_weights_file() {
    let s = Scratch::copy_of("odd_f16", "noweights");
    std::fs::remove_file(s.path("model.safetensors")).unwrap();
    let e = err_of(&s.0);
    assert!(e.contains("no safetensors weights"), "{e}");
    // a shard named by the index is gone
    let s = Scratch::copy_of("prenorm_f32", "noshard");
    std::fs::remove_file(s.path("model-00002-of-00003.safetensors")).unwrap();
    let e = err_of(&s.0);
    assert!(e.contains("model-00002-of-00003.safetensors"), "{e}");
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let s = Scratch::copy_of("odd_f16", "truncated");
    let p = s.path("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = err_of(&s.0);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
    std::fs::write(&p, b"garbage").unwrap();
    let e = err_of(&s.0);
    assert!(e.contains("model.safetensors"), "{e}");
    // corrupt index
    let s = Scratch::copy_of("prenorm_f32", "badindex");
    std::fs::write(
        s.path("model.safetensors.index.json"),
        b"{\"weight_map\": 3}",
    )
    .unwrap();
    let e = err_of(&s.0);
    assert!(e.contains("model.safetensors.index.json"), "{e}");
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let s = Scratch::copy_of("odd_f16", "shape");
    let p = s.path("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"ffn_dim\": 72", "\"ffn_dim\": 80");
    std::fs::write(&p, text).unwrap();
    let e = err_of(&s.0);
    assert!(e.contains("fc1.weight") && e.contains("[72, 40]"), "{e}");
}

#[test]
fn unsupported_architecture_and_dtype() {
    let s = Scratch::copy_of("odd_f16", "arch");
    let p = s.path("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"model_type\": \"opt\"", "\"model_type\": \"gpt2\"");
    std::fs::write(&p, text).unwrap();
    let e = err_of(&s.0);
    assert!(e.contains("gpt2") && e.contains("config.json"), "{e}");

    // an integer tensor where weights are expected
    let s = Scratch::copy_of("odd_f16", "dtype");
    let p = s.path("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let target = "decoder.layers.1.fc2.bias";
    let t = owned.iter_mut().find(|t| t.0 == target).unwrap();
    t.1 = safetensors::Dtype::I16;
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &p).unwrap();
    match load_cpu_model(&s.0, CpuOptions::default()) {
        Ok(_) => panic!("an I16 tensor loaded"),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(e.contains(target) && e.contains("I16"), "{e}");
        }
    }
}

#[test]
fn missing_tensor_is_named() {
    let s = Scratch::copy_of("postln_bf16", "missing");
    let p = s.path("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.contains("project_in"))
        .collect();
    safetensors::serialize_to_file(views, &None, &p).unwrap();
    let e = err_of(&s.0);
    assert!(
        e.contains("model.decoder.project_in.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn prompt_longer_than_positions() {
    let (cfg, dev, w) = load_cpu_model(&fixture("odd_f16"), CpuOptions::default()).unwrap();
    let opts = GenOptions {
        max_new_tokens: 4,
        sample: SampleMode::Greedy,
        stop_token: None,
        keep_logits: false,
        teacher: None,
    };
    let long = vec![vec![5u32; cfg.max_position_embeddings - 2]];
    let e = generate(&dev, &cfg, &w, &long, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("positions"), "{e}");
    let bad = vec![vec![5u32, cfg.vocab_size as u32]];
    let e = generate(&dev, &cfg, &w, &bad, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocabulary"), "{e}");
}

#[test]
fn runner_reports_errors_without_panicking() {
    let bin = env!("CARGO_BIN_EXE_flexbench-native");
    let input =
        std::env::temp_dir().join(format!("flexbench-bad-input-{}.json", std::process::id()));
    std::fs::write(&input, b"{\"prompts\": \"nope\"}").unwrap();
    let out = std::process::Command::new(bin)
        .args(["generate", "--model"])
        .arg(fixture("odd_f16"))
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    std::fs::remove_file(&input).ok();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("flexbench-native: error") && err.contains("prompts"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn untied_head_must_be_present() {
    let s = Scratch::copy_of("odd_f16", "untied");
    let p = s.path("config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace(
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    assert!(text.contains("\"tie_word_embeddings\": false"));
    std::fs::write(&p, text).unwrap();
    let e = err_of(&s.0);
    assert!(
        e.contains("lm_head.weight") && e.contains("tie_word_embeddings"),
        "{e}"
    );
}

/// Rewrites one key of a scratch checkpoint's config.json.
fn set_config(s: &Scratch, key: &str, value: serde_json::Value) {
    let p = s.path("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c[key] = value;
    std::fs::write(&p, serde_json::to_string(&c).unwrap()).unwrap();
}

#[test]
fn layer_counts_that_disagree_with_the_tensors_are_refused_before_anything_is_allocated() {
    // A billion layers: the first missing one is named at once (it used to allocate 5 GB and
    // abort building the list of every expected tensor).
    let s = Scratch::copy_of("odd_f16", "billion");
    set_config(&s, "num_hidden_layers", 1_000_000_000u64.into());
    let e = err_of(&s.0);
    assert!(
        e.contains("layers.3.") && e.contains("1000000000 layers") && e.contains("has 3"),
        "{e}"
    );
    // Fewer layers than the checkpoint holds: the extra layer's tensors are named.
    let s = Scratch::copy_of("odd_f16", "fewer");
    set_config(&s, "num_hidden_layers", 2.into());
    let e = err_of(&s.0);
    assert!(
        e.contains("decoder.layers.2.") && e.contains("not part of the model"),
        "{e}"
    );
}

#[test]
fn token_ids_outside_the_vocabulary_name_config_json() {
    let s = Scratch::copy_of("odd_f16", "padid");
    set_config(&s, "pad_token_id", 1_000_000.into());
    let e = err_of(&s.0);
    assert!(
        e.contains("pad_token_id 1000000")
            && e.contains("vocab_size 120")
            && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn a_checkpoint_named_as_a_registry_model_must_be_that_model() {
    let case = bench_core::Case {
        weights: bench_core::Weights::Checkpoint(fixture("odd_f16")),
        ..bench_core::Case::example("native")
    };
    let e = format!(
        "{:#}",
        bench_core::inputs::check_checkpoint_matches(&case).unwrap_err()
    );
    assert!(
        e.contains("opt-125m") && e.contains("hidden_size 40 (the model's is 768)"),
        "{e}"
    );
    // Named after itself, the same checkpoint is fine.
    let own = bench_core::Case {
        model: "odd_f16".into(),
        ..case
    };
    bench_core::inputs::check_checkpoint_matches(&own).unwrap();
}

#[test]
fn generate_flags_that_overflow_say_which_flag() {
    let bin = env!("CARGO_BIN_EXE_flexbench-native");
    let input =
        std::env::temp_dir().join(format!("flexbench-bad-flags-{}.json", std::process::id()));
    std::fs::write(&input, br#"{"prompts": [[5, 6, 7], [8, 9]]}"#).unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(["generate", "--model"])
            .arg(fixture("odd_f16"))
            .arg("--input")
            .arg(&input)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let e = run(&["--max-new-tokens", "18446744073709551615"]);
    assert!(
        e.contains("18446744073709551615 new tokens") && e.contains("positions"),
        "{e}"
    );
    let e = run(&[
        "--percent",
        "0",
        "100",
        "100",
        "0",
        "100",
        "0",
        "--max-new-tokens",
        "18446744073709551615",
    ]);
    assert!(e.contains("new tokens") && !e.contains("append_kv"), "{e}");
    let e = run(&[
        "--gpu-batch-size",
        "9223372036854775808",
        "--num-gpu-batches",
        "2",
    ]);
    assert!(e.contains("more sequences than can be counted"), "{e}");
    std::fs::remove_file(&input).ok();
}
