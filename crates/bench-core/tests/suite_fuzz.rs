//! The suite loader on hostile text: mutations of valid suites (cut, spliced, sprinkled with
//! brackets, huge numbers and wrong names) never panic, and every error names the file, with
//! the line and column wherever the parser found the problem.

use std::path::Path;

use bench_core::{Frameworks, Suite};
use proptest::prelude::*;

const PATH: &str = "suites/fuzz.ron";

const SEEDS: &[&str] = &[
    r#"(description: "x", defaults: (device: cpu, timeout_s: 60),
        cases: [(model: "opt-125m", framework: "engine", prompt_len: 8, gen_len: 8,
                 gpu_batch_size: 1, placement: gpu)])"#,
    r#"(grids: [(name: "g", models: ["opt-125m", "opt-tiny"], prompt_lens: [8, 16], gen_lens: [8],
                 frameworks: ["engine", "wrapper"], placements: [gpu, disk], gpu_batch_sizes: [1, 2],
                 cut_gen_len: {"opt-125m": 5})],
        excludes: [(model: "opt-tiny", placement: disk)])"#,
    r#"(cases: [(model: "opt-tiny", framework: "engine", prompt_len: 4, gen_len: 4, gpu_batch_size: 2,
                 placement: policy(percent: (20, 80, 0, 100, 0, 100), cpu_attention: true))])"#,
];

const TOKENS: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "\"",
    "\n",
    " ",
    "0",
    "1",
    "18446744073709551615",
    "-1",
    "1e309",
    "cpu",
    "cuda",
    "gpu",
    "disk",
    "policy",
    "percent",
    "\"engine\"",
    "\"wrapper\"",
    "\"nosuch\"",
    "\"opt-175b\"",
    "models",
    "cases",
    "grids",
    "timeout_s",
    "Some(",
    "None",
    "true",
    "//",
    "/*",
    "é",
    "\u{0}",
];

/// A valid seed with edits applied at positions chosen by the strategy.
fn mutated() -> impl Strategy<Value = String> {
    (
        0..SEEDS.len(),
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                0..4u8,
                0..TOKENS.len(),
                0..40usize,
            ),
            0..8,
        ),
    )
        .prop_map(|(seed, edits)| {
            let mut text: Vec<char> = SEEDS[seed].chars().collect();
            for (at, kind, token, len) in edits {
                let i = at.index(text.len() + 1);
                match kind {
                    0 => {
                        let end = (i + len).min(text.len());
                        text.drain(i..end);
                    }
                    1 => {
                        for (k, c) in TOKENS[token].chars().enumerate() {
                            text.insert(i + k, c);
                        }
                    }
                    2 => {
                        let end = (i + len).min(text.len());
                        let copy: Vec<char> = text[i..end].to_vec();
                        for (k, c) in copy.into_iter().enumerate() {
                            text.insert(end + k, c);
                        }
                    }
                    _ => text.truncate(i),
                }
            }
            text.into_iter().collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn hostile_suite_text_never_panics_and_errors_name_the_file(text in mutated()) {
        let frameworks = Frameworks::new(&[("engine", true), ("wrapper", false)]);
        match Suite::parse(Path::new(PATH), &text, &frameworks) {
            Ok(suite) => {
                // Whatever parses expands within the limit and validates.
                prop_assert!(suite.cases().len() <= bench_core::suite::MAX_CASES);
                for c in suite.cases() {
                    prop_assert!(c.case.validate().is_ok());
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                prop_assert!(msg.starts_with(PATH), "{msg}");
                // The parser's own errors carry the position: `file:line:col: ...`.
                let rest = &msg[PATH.len()..];
                let positioned = rest.starts_with(':')
                    && rest[1..].split(':').take(2).all(|n| n.trim().parse::<usize>().is_ok());
                let semantic = rest.starts_with(": ");
                prop_assert!(positioned || semantic, "{msg}");
                prop_assert!(msg.contains("fix") || positioned, "says what to do: {msg}");
            }
        }
    }
}
