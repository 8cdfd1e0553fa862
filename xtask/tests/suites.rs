//! The repository's suite files expand to exactly the cases of the reference, and bad suite files
//! fail with the file, position and a fix. The frameworks are the registry's.

use std::path::{Path, PathBuf};

use bench_core::suite::{self, Suite};
use bench_core::{Case, Device, Frameworks, Placement, Weights};

fn frameworks() -> Frameworks {
    Frameworks::of(&xtask::backends::registry())
}

fn suites_dir() -> PathBuf {
    xtask::suites_dir()
}

fn load(name: &str) -> Suite {
    Suite::load(&suite::resolve(&suites_dir(), name).unwrap(), &frameworks()).unwrap()
}

#[test]
fn hf_ds_is_the_reference_grid() {
    let s = load("hf_ds");
    assert_eq!(s.name, "hf_ds");
    // (framework, model, prompt) -> (batch, placement), from the reference table.
    let table = [
        ("hf", "opt-6.7b", 256, 4, Placement::Gpu),
        ("hf", "opt-6.7b", 512, 2, Placement::Gpu),
        ("hf", "opt-6.7b", 1024, 1, Placement::Gpu),
        ("hf", "opt-30b", 256, 16, Placement::Cpu),
        ("hf", "opt-30b", 512, 8, Placement::Cpu),
        ("hf", "opt-30b", 1024, 4, Placement::Cpu),
        ("hf", "opt-175b", 256, 4, Placement::Disk),
        ("hf", "opt-175b", 512, 2, Placement::Disk),
        ("hf", "opt-175b", 1024, 1, Placement::Disk),
        ("deepspeed", "opt-6.7b", 256, 32, Placement::Cpu),
        ("deepspeed", "opt-6.7b", 512, 16, Placement::Cpu),
        ("deepspeed", "opt-6.7b", 1024, 8, Placement::Cpu),
        ("deepspeed", "opt-30b", 256, 8, Placement::Cpu),
        ("deepspeed", "opt-30b", 512, 4, Placement::Cpu),
        ("deepspeed", "opt-30b", 1024, 2, Placement::Cpu),
        ("deepspeed", "opt-175b", 256, 2, Placement::Disk),
        ("deepspeed", "opt-175b", 512, 1, Placement::Disk),
        ("deepspeed", "opt-175b", 1024, 1, Placement::Disk),
    ];
    let cases = s.expand();
    assert_eq!(cases.len(), 18);
    for (fw, model, prompt, bs, placement) in table {
        let matching: Vec<_> = cases
            .iter()
            .filter(|c| c.framework == fw && c.model == model && c.prompt_len == prompt)
            .collect();
        assert_eq!(matching.len(), 1, "{fw} {model} {prompt}");
        let c = matching[0];
        assert_eq!(c.gpu_batch_size, bs, "{fw} {model} {prompt}");
        assert_eq!(c.num_gpu_batches, 1);
        assert_eq!(c.placement, placement, "{fw} {model} {prompt}");
        assert_eq!(c.gen_len, 32);
        let cut = if model == "opt-6.7b" { None } else { Some(5) };
        assert_eq!(c.cut_gen_len, cut, "{model}");
        assert_eq!(c.device, Device::Cuda);
        assert_eq!(c.weights, Weights::Dummy);
        assert_eq!((c.num_nodes, c.num_gpus_per_node), (1, 1));
    }
    // Expansion is deterministic: loading twice gives the same ids in the same order.
    let again: Vec<String> = load("hf_ds").expand().iter().map(|c| c.id()).collect();
    assert_eq!(again, cases.iter().map(|c| c.id()).collect::<Vec<_>>());
}

#[test]
fn flexllmgen_1x1_mirrors_bench_suite() {
    let cases = load("flexllmgen_1x1").expand();
    assert_eq!(cases.len(), 18);
    let find = |model: &str, prompt: usize, compressed: bool| {
        cases
            .iter()
            .find(|c| {
                c.model == model
                    && c.prompt_len == prompt
                    && c.placement.policy().compress_cache == compressed
            })
            .unwrap_or_else(|| panic!("{model} {prompt} {compressed}"))
    };
    let c = find("opt-6.7b", 256, false);
    assert_eq!((c.gpu_batch_size, c.num_gpu_batches), (4, 1));
    assert_eq!(c.placement.policy().percent, [100, 0, 100, 0, 100, 0]);
    assert!(!c.placement.policy().overlap);
    assert_eq!(find("opt-6.7b", 1024, true).gpu_batch_size, 28);
    let c = find("opt-30b", 512, false);
    assert_eq!(
        (c.gpu_batch_size, c.num_gpu_batches, c.cut_gen_len),
        (48, 3, Some(5))
    );
    assert!(c.placement.policy().cpu_attention);
    let c = find("opt-175b", 512, false);
    assert_eq!((c.gpu_batch_size, c.num_gpu_batches), (32, 8));
    assert_eq!(c.placement.policy().percent, [0, 50, 0, 0, 0, 100]);
    assert!(!c.placement.policy().pin_weight);
    let c = find("opt-175b", 512, true);
    assert_eq!((c.gpu_batch_size, c.num_gpu_batches), (48, 3));
    assert!(c.placement.policy().compress_weight);
}

#[test]
fn smoke_runs_on_the_cpu() {
    let cases = load("smoke").expand();
    assert!(cases
        .iter()
        .all(|c| c.device == Device::Cpu && c.framework == "native" && c.model == "opt-125m"));
    let has = |bs: usize, prompt: usize| {
        cases.iter().any(|c| {
            c.gpu_batch_size == bs
                && c.prompt_len == prompt
                && c.gen_len == 32
                && c.placement == Placement::Gpu
        })
    };
    assert!(has(4, 128) && has(16, 256));
    let policies: Vec<_> = cases.iter().map(|c| c.placement.policy()).collect();
    assert!(
        policies.iter().any(|p| p.weights().2 == 100),
        "a weights-on-disk case"
    );
    assert!(
        policies.iter().any(|p| p.cache().2 == 100),
        "a cache-on-disk case"
    );
}

/// Parses `text` as a suite at a fake path and returns the error message.
fn error_of(text: &str) -> String {
    match Suite::parse(Path::new("suites/bad.ron"), text, &frameworks()) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => format!("{e:#}"),
    }
}

const GOOD_CASE: &str = r#"(model: "opt-125m", framework: "native", prompt_len: 8, gen_len: 8, gpu_batch_size: 1, placement: gpu)"#;

#[test]
fn malformed_ron_names_line_and_column() {
    let e = error_of("(\n  cases: [\n    (model: \"opt-125m\" framework: \"native\")\n  ],\n)");
    assert!(e.starts_with("suites/bad.ron:3:"), "{e}");
    assert!(e.contains("fix:"), "{e}");
    let e = error_of("(\n  cases: [\n");
    assert!(e.starts_with("suites/bad.ron:"), "{e}");
    assert!(e.contains("unclosed") || e.contains("fix:"), "{e}");
}

#[test]
fn unknown_key_is_refused() {
    let e = error_of("(\n  defaults: (device: cpu),\n  grids: [],\n  casez: [],\n)");
    assert!(e.starts_with("suites/bad.ron:4:"), "{e}");
    assert!(e.contains("casez"), "{e}");
    assert!(e.contains("rename it"), "{e}");
    let e = error_of(&format!(
        "(cases: [{}])",
        GOOD_CASE.replace("gen_len: 8", "gen_len: 8, batch: 3")
    ));
    assert!(
        e.contains("batch") && e.starts_with("suites/bad.ron:1:"),
        "{e}"
    );
}

#[test]
fn percents_over_100_are_refused() {
    let text = format!(
        "(\n cases: [\n  {}\n ],\n)",
        GOOD_CASE.replace(
            "placement: gpu",
            "placement: policy(percent: (60, 50, 100, 0, 100, 0))"
        )
    );
    let e = error_of(&text);
    assert!(e.starts_with("suites/bad.ron:3:"), "{e}");
    assert!(e.contains("110"), "{e}");
    // A single value over 255 does not even fit.
    let bad = GOOD_CASE.replace(
        "placement: gpu",
        "placement: policy(percent: (300, 0, 100, 0, 100, 0))",
    );
    let e = error_of(&format!("(cases: [{bad}])"));
    assert!(e.starts_with("suites/bad.ron:1:"), "{e}");
}

#[test]
fn cut_gen_len_below_4_is_refused() {
    let e = error_of(&format!(
        "(cases: [{}])",
        GOOD_CASE.replace("gen_len: 8", "gen_len: 8, cut_gen_len: 3")
    ));
    assert!(e.starts_with("suites/bad.ron:1:"), "{e}");
    assert!(e.contains("cut_gen_len 3 is below 4"), "{e}");
    let grid = r#"(grids: [(models: ["opt-125m"], prompt_lens: [8], gen_lens: [32], frameworks: ["native"],
        placements: [gpu], gpu_batch_sizes: [1],
        cut_gen_len: {"opt-125m": 2})])"#;
    let e = error_of(grid);
    assert!(
        e.starts_with("suites/bad.ron:3:") && e.contains("below 4"),
        "{e}"
    );
}

#[test]
fn duplicate_cases_are_refused() {
    let e = error_of(&format!("(cases: [{GOOD_CASE}, {GOOD_CASE}])"));
    assert!(
        e.contains("cases[1]") && e.contains("same case as cases[0]"),
        "{e}"
    );
    assert!(e.starts_with("suites/bad.ron: "), "{e}");
    // A grid cell and an explicit case can collide too.
    let text = format!(
        r#"(grids: [(name: "g", models: ["opt-125m"], prompt_lens: [8], gen_lens: [8], frameworks: ["native"],
            placements: [gpu], gpu_batch_sizes: [1])], cases: [{GOOD_CASE}])"#
    );
    let e = error_of(&text);
    assert!(e.contains("grid `g`") && e.contains("cases[0]"), "{e}");
}

#[test]
fn unknown_names_and_missing_cells() {
    let e = error_of(&format!(
        "(cases: [{}])",
        GOOD_CASE.replace("opt-125m", "opt-7b")
    ));
    assert!(
        e.contains("unknown model `opt-7b`") && e.contains("opt-6.7b"),
        "{e}"
    );
    let e = error_of(&format!(
        "(cases: [{}])",
        GOOD_CASE.replace("native", "vllm")
    ));
    assert!(e.contains("unknown framework `vllm`"), "{e}");
    let e = error_of(&format!(
        "(cases: [{}])",
        GOOD_CASE.replace("gpu)", "tape)")
    ));
    assert!(e.contains("tape"), "{e}");
    let grid = r#"(grids: [(models: ["opt-125m"], prompt_lens: [8, 16], gen_lens: [8], frameworks: ["native"],
        cells: [(prompt_len: 8, gpu_batch_size: 1, placement: gpu)])])"#;
    let e = error_of(grid);
    assert!(
        e.contains("prompt_len 16") && e.contains("no batch size") && e.contains("fix:"),
        "{e}"
    );
    let grid = r#"(grids: [(name: "g", models: ["opt-125m"], prompt_lens: [8], gen_lens: [8], frameworks: ["native"],
        cells: [(prompt_len: 8, gpu_batch_size: 1, placement: gpu), (prompt_len: 9, gpu_batch_size: 1, placement: gpu)])])"#;
    let e = error_of(grid);
    assert!(
        e.contains("grid `g` (grids[0]): cells[1] matches no"),
        "{e}"
    );
    // Cases that only fail the whole-case checks name where they came from.
    let e = error_of(&format!(
        "(cases: [{}])",
        GOOD_CASE.replace("prompt_len: 8", "prompt_len: 4000")
    ));
    assert!(e.contains("cases[0]") && e.contains("positions"), "{e}");
    let e = error_of(&format!(
        "(cases: [{}], excludes: [(model: \"opt-30b\")])",
        GOOD_CASE
    ));
    assert!(e.contains("excludes[0] matches no case"), "{e}");
}

#[test]
fn excludes_and_defaults() {
    let text = r#"(
        defaults: (device: cpu, repetitions: 3, timeout_s: 9),
        grids: [(models: ["opt-125m", "opt-tiny"], prompt_lens: [8, 16], gen_lens: [8], frameworks: ["native"],
                 placements: [gpu, disk], gpu_batch_sizes: [1, 2], defaults: (repetitions: 2))],
        excludes: [(model: "opt-tiny", placement: disk)],
    )"#;
    let s = Suite::parse(Path::new("x.ron"), text, &frameworks()).unwrap();
    let cases = s.expand();
    assert_eq!(cases.len(), 2 * 2 * 2 * 2 - 4);
    assert!(cases
        .iter()
        .all(|c| c.repetitions == 2 && c.device == Device::Cpu && c.timeout_s == Some(9)));
    assert!(!cases
        .iter()
        .any(|c| c.model == "opt-tiny" && c.placement == Placement::Disk));
    // Order: models, then prompt lengths, then batch sizes, then placements.
    let first: Vec<_> = cases
        .iter()
        .take(4)
        .map(|c| (c.prompt_len, c.gpu_batch_size, c.placement.label()))
        .collect();
    assert_eq!(
        first,
        [
            (8, 1, "gpu".into()),
            (8, 1, "disk".into()),
            (8, 2, "gpu".into()),
            (8, 2, "disk".into())
        ]
    );
}

#[test]
fn suite_lookup() {
    let dir = suites_dir();
    assert!(suite::resolve(&dir, "smoke")
        .unwrap()
        .ends_with("smoke.ron"));
    let path = dir.join("hf_ds.ron");
    assert_eq!(suite::resolve(&dir, path.to_str().unwrap()).unwrap(), path);
    let e = suite::resolve(&dir, "smokey").unwrap_err().to_string();
    assert!(
        e.contains("unknown suite `smokey`") && e.contains("hf_ds") && e.contains("smoke"),
        "{e}"
    );
    let e = suite::resolve(&dir, "nowhere/x.ron")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
}

/// FlexLLMGen's own suites need 4-bit weights and cache: every case of flexllmgen_1x1 is one
/// the native engine runs (on a GPU machine; here the CUDA probe answers), its policy valid and
/// its model's shapes fit groups of 64.
#[test]
fn flexllmgen_1x1_needs_no_feature_the_native_engine_lacks() {
    let cases = load("flexllmgen_1x1").expand();
    let mut compressed = 0;
    for c in &cases {
        backend_native::runner::check_features(c)
            .unwrap_or_else(|u| panic!("{} {}: {u}", c.model, c.placement.label()));
        let p = c.placement.policy();
        backend_native::schedule::check_policy(&p).unwrap();
        let cfg = bench_core::model::lookup(&c.model).unwrap();
        if p.compress_weight {
            let specs = bench_core::model::layout::checkpoint_tensors(&cfg);
            backend_native::compress::shapes::check_weights(
                specs.iter().map(|s| (s.name.as_str(), s.shape.as_slice())),
            )
            .unwrap();
        }
        if p.compress_cache {
            backend_native::compress::shapes::check_cache(&cfg).unwrap();
            compressed += 1;
        }
    }
    assert_eq!(
        compressed, 9,
        "6b7, 30b and 175b _comp at three prompt lengths"
    );
}

/// The CPU compression suite: opt-1.3b on the CPU device, every compressed case beside its
/// uncompressed twin (the same case with the compression flags off), and a sparse case.
#[test]
fn compress_cpu_pairs_every_compressed_case_with_its_twin() {
    let cases = load("compress_cpu").expand();
    assert!(cases
        .iter()
        .all(|c| c.model == "opt-1.3b" && c.device == Device::Cpu && c.cut_gen_len == Some(4)));
    let plain = |c: &Case| {
        let mut p = c.placement.policy();
        p.compress_weight = false;
        p.compress_cache = false;
        Case {
            placement: Placement::Policy(p),
            ..c.clone()
        }
    };
    let mut tiers = std::collections::BTreeSet::new();
    for c in &cases {
        let p = c.placement.policy();
        if p.compress_weight || p.compress_cache {
            let twin = plain(c);
            assert!(
                cases.contains(&twin),
                "{} has no uncompressed twin",
                c.placement.label()
            );
            if p.compress_weight {
                tiers.insert(("weights", p.weights()));
            }
            if p.compress_cache {
                tiers.insert(("cache", p.cache()));
            }
        }
    }
    for (what, all) in [
        ("weights", [(100, 0, 0), (0, 100, 0), (0, 0, 100)]),
        ("cache", [(100, 0, 0), (0, 100, 0), (0, 0, 100)]),
    ] {
        for t in all {
            assert!(tiers.contains(&(what, t)), "no compressed {what} on {t:?}");
        }
    }
    assert!(cases
        .iter()
        .any(|c| c.placement.policy().attn_sparsity < 1.0));
}

#[test]
fn policy_cpu_compares_auto_with_a_hand_grid() {
    let s = load("policy_cpu");
    let cases = s.expand();
    let auto: Vec<&Case> = cases
        .iter()
        .filter(|c| c.placement == Placement::Auto)
        .collect();
    assert_eq!(auto.len(), 1);
    assert!(auto[0].unresolved());
    let hand: Vec<&Case> = cases
        .iter()
        .filter(|c| matches!(c.placement, Placement::Policy(_)))
        .collect();
    assert!(hand.len() >= 8, "{} hand policies", hand.len());
    for c in &cases {
        assert_eq!(c.device, Device::Cpu);
        let m = c.memory.expect("memory limits force offloading");
        assert!(m.compute.is_some() && m.host.is_some() && m.disk.is_some());
        // the limits force offloading: the weights fit neither tier whole, and every hand
        // policy fits them (the runner refuses one that does not)
        let cfg = bench_core::model::lookup(&c.model).unwrap();
        for whole in [[100, 0, 100, 0, 100, 0], [0, 100, 100, 0, 100, 0]] {
            let all = Case {
                placement: Placement::Policy(bench_core::Policy::new(whole)),
                auto: None,
                ..(*c).clone()
            };
            assert!(backend_native::policy::check_declared_limits(&all, &cfg).is_err());
        }
        if matches!(c.placement, Placement::Policy(_)) {
            backend_native::policy::check_declared_limits(c, &cfg).unwrap();
        }
        assert_eq!((c.gpu_batch_size, c.num_gpu_batches), (8, 2));
    }
}

const AUTO_SUITE: &str = r#"(
    defaults: (device: cpu, memory: (compute: "2GiB", disk: "1.5TB")),
    grids: [(
        models: ["opt-125m"], prompt_lens: [8], gen_lens: [8], frameworks: ["native", "hf"],
        gpu_batch_sizes: [auto, 4],
        placements: [gpu],
        defaults: (memory: (host: "512MiB")),
    )],
    cases: [(model: "opt-125m", framework: "native", prompt_len: 8, gen_len: 8,
             gpu_batch_size: 2, placement: auto, memory: (compute: "1GiB"))],
)"#;

#[test]
fn auto_batches_placements_and_memory_limits_parse() {
    let s = Suite::parse(Path::new("suites/auto.ron"), AUTO_SUITE, &frameworks()).unwrap();
    let cases = s.expand();
    assert_eq!(cases.len(), 5);
    let auto_batch: Vec<&Case> = cases
        .iter()
        .filter(|c| c.auto.as_ref().is_some_and(|a| a.gpu_batch_size))
        .collect();
    assert_eq!(
        auto_batch.len(),
        2,
        "native and hf with gpu_batch_size auto"
    );
    for c in &auto_batch {
        assert!(c.unresolved());
        let m = c.memory.unwrap();
        // the grid's host limit over the suite's compute and disk ones
        assert_eq!(m.compute.unwrap().0, 2 << 30);
        assert_eq!(m.host.unwrap().0, 512 << 20);
        assert_eq!(m.disk.unwrap().0, 1_500_000_000_000);
    }
    let placed: Vec<&Case> = cases
        .iter()
        .filter(|c| c.placement == Placement::Auto)
        .collect();
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].gpu_batch_size, 2);
    assert_eq!(placed[0].memory.unwrap().compute.unwrap().0, 1 << 30);
    assert_eq!(placed[0].memory.unwrap().host, None);
    // the ids differ from the fixed-batch cases' and are stable
    let again = Suite::parse(Path::new("suites/auto.ron"), AUTO_SUITE, &frameworks()).unwrap();
    let ids: Vec<String> = cases.iter().map(Case::id).collect();
    assert_eq!(ids, again.expand().iter().map(Case::id).collect::<Vec<_>>());
}

#[test]
fn bad_limits_and_auto_for_a_preset_framework_are_refused() {
    let with =
        |memory: &str| format!("(\n  defaults: (memory: {memory}),\n  cases: [{GOOD_CASE}],\n)");
    let e = error_of(&with(r#"(compute: "16")"#));
    assert!(
        e.starts_with("suites/bad.ron:2:") && e.contains("no unit"),
        "{e}"
    );
    let e = error_of(&with(r#"(host: "-2GiB")"#));
    assert!(
        e.starts_with("suites/bad.ron:2:") && e.contains("negative"),
        "{e}"
    );
    let e = error_of(&with("(disk: 100)"));
    assert!(e.contains("no unit"), "{e}");
    let e = error_of(&with(r#"(gpu: "1GiB")"#));
    assert!(e.contains("gpu"), "{e}");
    let e = error_of(&format!(
        "(cases: [{}])",
        GOOD_CASE
            .replace("\"native\"", "\"hf\"")
            .replace("placement: gpu", "placement: auto")
    ));
    assert!(e.contains("not `auto`"), "{e}");
    let e = error_of(&format!(
        "(cases: [{}])",
        GOOD_CASE.replace("gpu_batch_size: 1", "gpu_batch_size: many")
    ));
    assert!(e.contains("batch size"), "{e}");
}
