//! The house rules, checked like any other test (as rust-analyzer's tidy does): bench-core names
//! no framework, no backend crate depends on a sibling, every Rust file says what it holds, and
//! the README's layout names every crate.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "target") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn crate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(xtask::project_root().join("crates"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    dirs
}

/// The code of a Rust file without its comments (line comments and doc comments).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("")))
        .filter(|(_, l)| !l.trim().is_empty())
}

#[test]
fn bench_core_names_no_framework() {
    let root = xtask::project_root();
    let backends = xtask::backends::registry();
    let mut names: Vec<String> = backends
        .iter()
        .flat_map(|b| b.frameworks().iter().map(|f| format!("\"{f}\"")))
        .collect();
    // The backend crates by name, in code (paths) and in the manifest (dependencies).
    let crates: Vec<String> = crate_dirs()
        .iter()
        .filter_map(|d| d.file_name()?.to_str().map(String::from))
        .filter(|n| n.starts_with("backend-"))
        .collect();
    names.extend(crates.iter().map(|c| c.replace('-', "_")));
    let mut found = Vec::new();
    for f in rust_files(&root.join("crates/bench-core/src")) {
        let text = std::fs::read_to_string(&f).unwrap();
        for (line, code) in code_lines(&text) {
            for n in &names {
                if code.contains(n.as_str()) {
                    found.push(format!("{}:{line}: {n}", f.display()));
                }
            }
        }
    }
    let manifest = std::fs::read_to_string(root.join("crates/bench-core/Cargo.toml")).unwrap();
    for c in &crates {
        if manifest.contains(c.as_str()) {
            found.push(format!("crates/bench-core/Cargo.toml: {c}"));
        }
    }
    assert!(
        found.is_empty(),
        "bench-core must learn frameworks from the Backend trait only:\n{}",
        found.join("\n")
    );
}

#[test]
fn no_backend_crate_depends_on_a_sibling() {
    let dirs = crate_dirs();
    let backends: Vec<String> = dirs
        .iter()
        .filter_map(|d| d.file_name()?.to_str().map(String::from))
        .filter(|n| n.starts_with("backend-"))
        .collect();
    assert!(backends.len() >= 3, "{backends:?}");
    let mut found = Vec::new();
    for b in &backends {
        let manifest = std::fs::read_to_string(
            xtask::project_root()
                .join("crates")
                .join(b)
                .join("Cargo.toml"),
        )
        .unwrap();
        for other in backends.iter().filter(|o| *o != b) {
            // Any table: dependencies, dev-dependencies, build-dependencies.
            if manifest.lines().any(|l| {
                l.trim_start().starts_with(&format!("{other} "))
                    || l.trim_start().starts_with(&format!("{other}."))
                    || l.trim_start().starts_with(&format!("{other}="))
            }) {
                found.push(format!("{b} depends on {other}"));
            }
        }
        for f in rust_files(&xtask::project_root().join("crates").join(b)) {
            let text = std::fs::read_to_string(&f).unwrap();
            for other in backends.iter().filter(|o| *o != b) {
                if text.contains(&format!("../{other}/")) {
                    found.push(format!("{} reaches into {other}", f.display()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "each backend stands on bench-core alone; move what they share into bench-core:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_rust_file_says_what_it_holds() {
    let root = xtask::project_root();
    let mut files = rust_files(&root.join("crates"));
    files.extend(rust_files(&root.join("xtask")));
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            !text
                .lines()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.starts_with("//!"))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "start these with a //! comment saying what the module holds and why:\n{}",
        missing.join("\n")
    );
}

#[test]
fn readme_layout_names_every_crate() {
    let root = xtask::project_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let layout = readme
        .split("## Layout")
        .nth(1)
        .expect("README.md has a `## Layout` section")
        .split("\n## ")
        .next()
        .unwrap();
    let missing: Vec<String> = crate_dirs()
        .iter()
        .filter_map(|d| d.file_name()?.to_str().map(String::from))
        .filter(|n| !layout.contains(&format!("crates/{n}/")))
        .collect();
    assert!(missing.is_empty(), "README.md's layout lacks {missing:?}");
}
