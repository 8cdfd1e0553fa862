//! Suites: RON files declaring grids and explicit cases, validated at load and expanded into
//! [`Case`]s in a deterministic order.
//!
//! A suite file (see `suites/*.ron` for real ones):
//! ```ron
//! (
//!     description: "what this suite measures",
//!     defaults: (device: cuda, weights: dummy, warmup: 1, repetitions: 1, timeout_s: 3600),
//!     grids: [(
//!         name: "s512",
//!         models: ["opt-6.7b", "opt-30b"],
//!         prompt_lens: [512],
//!         gen_lens: [32],
//!         frameworks: ["hf"],
//!         cut_gen_len: {"opt-30b": 5},
//!         cells: [
//!             (model: "opt-6.7b", gpu_batch_size: 2, placement: gpu),
//!             (model: "opt-30b", gpu_batch_size: 8, placement: cpu),
//!         ],
//!     )],
//!     cases: [(model: "opt-125m", framework: "native", prompt_len: 8, gen_len: 8,
//!              gpu_batch_size: 1, placement: policy(percent: (100, 0, 100, 0, 100, 0)))],
//!     excludes: [(model: "opt-30b", prompt_len: 1024)],
//! )
//! ```
//! Options may be written bare (`cut_gen_len: 5`, not `Some(5)`); a policy's `percent` is a tuple.
//!
//! Keys (every section refuses keys it does not know):
//! - suite: `description`, `defaults`, `grids`, `cases`, `excludes`, `check_projection` (true:
//!   add a full-length run per placement to measure the decode projection's error, see
//!   [`projection_checks`]);
//! - `defaults` (also per grid): `device` (cuda | cpu), `weights` (dummy | checkpoint("dir")),
//!   `warmup`, `repetitions` (a count, or `auto(min: 3, max: 10, target_ci: 0.05)`: repeat until
//!   the 95% interval of the total throughput is within ±target_ci of its median), `timeout_s`
//!   (1 s to 30 days), `num_nodes`, `num_gpus_per_node`, `num_gpu_batches`, `memory`
//!   (`(compute: "16GiB", host: "200GiB", disk: "1.5TB")`: the capacity a case may use per tier,
//!   each optional, sizes with their unit; a grid's or case's tiers override the suite's one by one);
//! - grid: `name`, `models`, `prompt_lens`, `gen_lens`, `frameworks`, `placements`,
//!   `gpu_batch_sizes`, `cut_gen_len` ({model: steps}), `cells`, `defaults`;
//! - cell: `framework`, `model`, `prompt_len` (the lookup keys; left out = any), `gpu_batch_size`,
//!   `num_gpu_batches`, `placement`, `cut_gen_len`;
//! - case: the [`Case`] fields (`model`, `framework`, `prompt_len`, `gen_len`, `gpu_batch_size`,
//!   `placement` required);
//! - exclude: `model`, `framework`, `prompt_len`, `gen_len`, `gpu_batch_size`, `placement`,
//!   `device` (a case is removed when all the given keys match; an exclude matching nothing is an
//!   error).
//!
//! Placements: `gpu`, `cpu`, `disk` (presets: the whole model on that tier),
//! `policy(percent: (wg, wc, cg, cc, ag, ac), overlap: .., sep_layer: .., pin_weight: ..,
//! cpu_attention: .., attn_sparsity: .., compress_weight: .., compress_cache: ..)`, or `auto`
//! (frameworks that take policies: the planner chooses one from the machine profile and the
//! case's `memory` limits). Batch sizes (`gpu_batch_sizes`, a cell's or case's
//! `gpu_batch_size`) may be `auto` too: the native planner chooses the batch and its GPU
//! batches, the baselines take the largest batch that fits the placement's tiers.
//!
//! Grid expansion: for every (model, prompt_len, gen_len, framework) in that order, the first cell
//! whose given keys (framework, model, prompt_len) match supplies the batch size, placement,
//! num_gpu_batches and cut_gen_len; what a cell leaves out comes from the grid's `gpu_batch_sizes`
//! and `placements` axes (expanded in that order) and the grid's per-model `cut_gen_len` table.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer};

use crate::auto::Auto;
use crate::backend::Frameworks;
use crate::case::{AdaptiveRepetitions, Case, Device, Placement, Weights};
use crate::memory::MemoryLimits;
use crate::model;

/// File extension of suite files.
pub const SUITE_EXT: &str = "ron";
/// Most cases a suite may expand to: more is a typo in an axis, and would only exhaust memory.
pub const MAX_CASES: usize = 100_000;

/// A loaded, validated suite and its expanded cases.
#[derive(Debug, Clone)]
pub struct Suite {
    /// The file stem: results go to `<out>/<name>/`.
    pub name: String,
    pub path: PathBuf,
    pub description: String,
    cases: Vec<SuiteCase>,
}

/// One expanded case and where in the file it came from (for error messages and `--dry-run`).
#[derive(Debug, Clone)]
pub struct SuiteCase {
    pub case: Case,
    pub origin: String,
}

impl Suite {
    /// Reads, parses and validates a suite file; `frameworks` are the names it may use.
    pub fn load(path: &Path, frameworks: &Frameworks) -> Result<Suite> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading suite file {}", path.display()))?;
        Suite::parse(path, &text, frameworks)
    }

    /// Parses and validates suite text; `path` names the file in errors and gives the suite name.
    pub fn parse(path: &Path, text: &str, frameworks: &Frameworks) -> Result<Suite> {
        check_batch_words(text).map_err(|(line, col, word)| {
            anyhow::anyhow!(
                "{}:{line}:{col}: `{word}` is not a batch size\n  fix: write a number or auto",
                path.display()
            )
        })?;
        let parsed = KNOWN_FRAMEWORKS.with(|k| {
            *k.borrow_mut() = frameworks.clone();
            let parsed = ron_options().from_str::<SuiteFile>(text);
            *k.borrow_mut() = Frameworks::default();
            parsed
        });
        let file: SuiteFile = parsed.map_err(|e| {
            anyhow::anyhow!(
                "{}:{}:{}: {}\n  fix: {}",
                path.display(),
                e.position.line,
                e.position.col,
                // ron 0.8 runs a name into the next word ("`cpuu`in enum").
                e.code.to_string().replace("`in ", "` in "),
                hint(&e.code)
            )
        })?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .with_context(|| format!("{}: a suite file needs a UTF-8 file name", path.display()))?
            .to_string();
        check_suite_name(&name).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut cases = file
            .expand(frameworks)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if file.check_projection {
            let checks = projection_checks(&cases);
            cases.extend(checks);
        }
        Ok(Suite {
            name,
            path: path.to_path_buf(),
            description: file.description,
            cases,
        })
    }

    /// The cases in expansion order: grids in file order, then explicit cases, minus excludes.
    pub fn expand(&self) -> Vec<Case> {
        self.cases.iter().map(|c| c.case.clone()).collect()
    }

    /// The cases with their origins.
    pub fn cases(&self) -> &[SuiteCase] {
        &self.cases
    }
}

/// The projection checks of `cases`: for each (framework, device, placement) whose cases project
/// their decode latency (`cut_gen_len`), its smallest case (model size, then batch, then prompt)
/// once more at its full gen_len, once, projecting from its first `cut_gen_len` steps as well
/// ([`Case::check_projection_at`]): projected and measured decode latency come from the same
/// run, so their difference is the projection's error and not run-to-run noise. Cases already
/// in `cases` are not added again.
pub fn projection_checks(cases: &[SuiteCase]) -> Vec<SuiteCase> {
    let mut smallest: BTreeMap<(String, &'static str, String), &SuiteCase> = BTreeMap::new();
    let size = |c: &Case| {
        (
            model::lookup(&c.model).map_or(0, |m| m.model_bytes()),
            c.batch_size(),
            c.prompt_len,
        )
    };
    for sc in cases.iter().filter(|sc| sc.case.cut_gen_len.is_some()) {
        let c = &sc.case;
        let key = (c.framework.clone(), c.device.as_str(), c.placement.label());
        let best = smallest.entry(key).or_insert(sc);
        if size(c) < size(&best.case) {
            *best = sc;
        }
    }
    let have: std::collections::HashSet<String> = cases.iter().map(|c| c.case.id()).collect();
    smallest
        .into_values()
        .map(|sc| SuiteCase {
            case: Case {
                check_projection_at: sc.case.cut_gen_len,
                cut_gen_len: None,
                repetitions: 1,
                adaptive_repetitions: None,
                ..sc.case.clone()
            },
            origin: format!("projection check of {}", sc.origin),
        })
        .filter(|sc| !have.contains(&sc.case.id()))
        .collect()
}

/// A suite's name becomes a directory under the results root, so it must stay one plain path
/// component: letters, digits, `_`, `-` and `.`, not starting with `.` (no `..`, no hidden dirs).
pub fn check_suite_name(name: &str) -> Result<(), String> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if plain {
        Ok(())
    } else {
        Err(format!(
            "the suite name `{name}` (the file name without .ron) names the results directory; \
             rename the file to letters, digits, `_`, `-` and `.`, not starting with `.`"
        ))
    }
}

/// Resolves `smoke` to `<suites_dir>/smoke.ron`, or takes an existing path as is. An unknown name
/// lists the available suites.
pub fn resolve(suites_dir: &Path, name_or_path: &str) -> Result<PathBuf> {
    let as_path = Path::new(name_or_path);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    if as_path.is_dir() {
        bail!("{name_or_path} is a directory, not a suite file: give a .ron file or a suite name");
    }
    let looks_like_path = name_or_path.contains('/') || name_or_path.ends_with(".ron");
    if !looks_like_path {
        let candidate = suites_dir.join(format!("{name_or_path}.{SUITE_EXT}"));
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let available = available(suites_dir);
    let list = if available.is_empty() {
        format!("none found in {}", suites_dir.display())
    } else {
        available.join(", ")
    };
    if looks_like_path {
        bail!("suite file {name_or_path} not found; available suites: {list}")
    }
    bail!(
        "unknown suite `{name_or_path}`; available suites: {list} (or give a path to a .ron file)"
    )
}

/// Names of the suite files in `suites_dir`, sorted.
pub fn available(suites_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(suites_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == SUITE_EXT).then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    names
}

fn ron_options() -> ron::Options {
    ron::Options::default()
        .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
        .with_default_extension(ron::extensions::Extensions::UNWRAP_VARIANT_NEWTYPES)
}

/// What to do about a parse error, in words.
fn hint(code: &ron::Error) -> &'static str {
    use ron::Error as E;
    match code {
        E::NoSuchStructField { .. } => "rename it to one of the expected keys, or remove it",
        E::MissingStructField { .. } => "add the missing key",
        E::DuplicateStructField { .. } => "keep one of the two entries",
        E::Eof => "the file ends early: check for an unclosed `(`, `[` or `{`",
        E::ExpectedComma | E::ExpectedArrayEnd | E::ExpectedStructLikeEnd | E::ExpectedMapEnd => {
            "check the commas and brackets just before this position"
        }
        E::NoSuchEnumVariant { .. } => "use one of the expected values listed above",
        E::IntegerOutOfBounds => "percents are 0..=100 and sizes are non-negative integers",
        E::Message(_) => "change the value at this position as the message says",
        E::ExpectedString => "quote the value: \"like this\"",
        _ => "see the suite format at the top of crates/bench-core/src/suite.rs and suites/*.ron",
    }
}

// ---- the file format ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    #[serde(default)]
    description: String,
    /// Add a projection check per placement ([`projection_checks`]).
    #[serde(default)]
    check_projection: bool,
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    grids: Vec<Grid>,
    #[serde(default)]
    cases: Vec<CaseSpec>,
    #[serde(default)]
    excludes: Vec<Exclude>,
}

/// Settings shared by cases; a grid's or case's own value wins over the suite's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    device: Option<Device>,
    weights: Option<Weights>,
    warmup: Option<usize>,
    repetitions: Option<RepetitionsSpec>,
    timeout_s: Option<TimeoutSecs>,
    num_nodes: Option<usize>,
    num_gpus_per_node: Option<usize>,
    num_gpu_batches: Option<usize>,
    memory: Option<MemoryLimits>,
}

impl Defaults {
    /// `self` where set, else `base`.
    fn over(&self, base: &Defaults) -> Defaults {
        Defaults {
            device: self.device.or(base.device),
            weights: self.weights.clone().or_else(|| base.weights.clone()),
            warmup: self.warmup.or(base.warmup),
            repetitions: self.repetitions.or(base.repetitions),
            timeout_s: self.timeout_s.or(base.timeout_s),
            num_nodes: self.num_nodes.or(base.num_nodes),
            num_gpus_per_node: self.num_gpus_per_node.or(base.num_gpus_per_node),
            num_gpu_batches: self.num_gpu_batches.or(base.num_gpu_batches),
            memory: match (self.memory, base.memory) {
                (Some(m), Some(b)) => Some(m.over(&b)),
                (m, b) => m.or(b),
            },
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Grid {
    /// Shown in errors and `--dry-run`'s origin column; defaults to `grids[i]`.
    #[serde(default)]
    name: Option<String>,
    models: Vec<ModelName>,
    prompt_lens: Vec<usize>,
    gen_lens: Vec<usize>,
    frameworks: Vec<FrameworkName>,
    #[serde(default)]
    placements: Vec<CheckedPlacement>,
    #[serde(default)]
    gpu_batch_sizes: Vec<BatchSpec>,
    /// Decode steps actually run, per model; other models run the full gen_len.
    #[serde(default)]
    cut_gen_len: BTreeMap<ModelName, CutGenLen>,
    #[serde(default)]
    cells: Vec<Cell>,
    /// Overrides the suite's defaults for this grid.
    #[serde(default)]
    defaults: Defaults,
}

/// One row of a grid's lookup table: keys left out match anything.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cell {
    framework: Option<FrameworkName>,
    model: Option<ModelName>,
    prompt_len: Option<usize>,
    gpu_batch_size: Option<BatchSpec>,
    num_gpu_batches: Option<usize>,
    placement: Option<CheckedPlacement>,
    cut_gen_len: Option<CutGenLen>,
}

impl Cell {
    fn matches(&self, framework: &str, model: &str, prompt_len: usize) -> bool {
        self.framework.as_ref().is_none_or(|f| f.0 == framework)
            && self.model.as_ref().is_none_or(|m| m.0 == model)
            && self.prompt_len.is_none_or(|p| p == prompt_len)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseSpec {
    model: ModelName,
    framework: FrameworkName,
    prompt_len: usize,
    gen_len: usize,
    cut_gen_len: Option<CutGenLen>,
    gpu_batch_size: BatchSpec,
    num_gpu_batches: Option<usize>,
    placement: CheckedPlacement,
    device: Option<Device>,
    weights: Option<Weights>,
    warmup: Option<usize>,
    repetitions: Option<RepetitionsSpec>,
    timeout_s: Option<TimeoutSecs>,
    num_nodes: Option<usize>,
    num_gpus_per_node: Option<usize>,
    memory: Option<MemoryLimits>,
}

/// Removes every expanded case matching all the keys given.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Exclude {
    model: Option<ModelName>,
    framework: Option<FrameworkName>,
    prompt_len: Option<usize>,
    gen_len: Option<usize>,
    gpu_batch_size: Option<usize>,
    placement: Option<CheckedPlacement>,
    device: Option<Device>,
}

impl Exclude {
    fn matches(&self, c: &Case) -> bool {
        self.model.as_ref().is_none_or(|m| m.0 == c.model)
            && self.framework.as_ref().is_none_or(|f| f.0 == c.framework)
            && self.prompt_len.is_none_or(|p| p == c.prompt_len)
            && self.gen_len.is_none_or(|g| g == c.gen_len)
            && self.gpu_batch_size.is_none_or(|b| b == c.gpu_batch_size)
            && self.placement.as_ref().is_none_or(|p| p.0 == c.placement)
            && self.device.is_none_or(|d| d == c.device)
    }
}

// Values checked while parsing, so that ron reports the line and column of a bad one.

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ModelName(String);

impl<'de> Deserialize<'de> for ModelName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // A name with an owner (`org/model`) may be a checkpoint the registry does not know.
        if model::lookup(&s).is_none() && !s.contains('/') {
            return Err(serde::de::Error::custom(format!(
                "unknown model `{s}`; known: {}",
                model::names().join(", ")
            )));
        }
        Ok(ModelName(s))
    }
}

thread_local! {
    /// The frameworks the suite being parsed may name: serde gives a deserializer no context, and
    /// checking names while parsing is what lets ron report a bad one's line and column.
    static KNOWN_FRAMEWORKS: std::cell::RefCell<Frameworks> = Default::default();
}

#[derive(Debug, Clone)]
struct FrameworkName(String);

impl<'de> Deserialize<'de> for FrameworkName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KNOWN_FRAMEWORKS
            .with(|k| k.borrow().check_name(&s))
            .map_err(serde::de::Error::custom)?;
        Ok(FrameworkName(s))
    }
}

/// `repetitions:` as written: a count, or `auto(min: .., max: .., target_ci: ..)` (any key left
/// out takes its default: 3, 10, 0.05).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RepetitionsSpec {
    Fixed(usize),
    Auto(AdaptiveRepetitions),
}

impl<'de> Deserialize<'de> for RepetitionsSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RepetitionsSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of repetitions, or auto(min: 3, max: 10, target_ci: 0.05)")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<RepetitionsSpec, E> {
                Ok(RepetitionsSpec::Fixed(n as usize))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<RepetitionsSpec, E> {
                u64::try_from(n)
                    .map_err(|_| E::custom(format!("repetitions {n} is negative")))
                    .and_then(|n| self.visit_u64(n))
            }
            // ron hands `auto(...)` over as a map (its name is not seen here).
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<RepetitionsSpec, A::Error> {
                #[derive(Deserialize)]
                #[serde(field_identifier, rename_all = "snake_case")]
                enum Key {
                    Min,
                    Max,
                    TargetCi,
                }
                let mut a = AdaptiveRepetitions::default();
                while let Some(k) = m.next_key::<Key>()? {
                    match k {
                        Key::Min => a.min = m.next_value()?,
                        Key::Max => a.max = m.next_value()?,
                        Key::TargetCi => a.target_ci = m.next_value()?,
                    }
                }
                a.validate().map_err(de::Error::custom)?;
                Ok(RepetitionsSpec::Auto(a))
            }
        }
        d.deserialize_any(V)
    }
}

impl RepetitionsSpec {
    /// Parses a command line's value: `5`, `auto` (3..10 to ±5%), or the suite syntax
    /// `auto(min: 3, max: 10, target_ci: 0.05)`.
    pub fn parse(text: &str) -> Result<RepetitionsSpec, String> {
        let text = text.trim();
        if text == "auto" {
            return Ok(RepetitionsSpec::Auto(AdaptiveRepetitions::default()));
        }
        let spec: RepetitionsSpec = ron_options().from_str(text).map_err(|e| {
            format!(
                "`{text}`: {} (write a count, `auto`, or auto(min: 3, max: 10, target_ci: 0.05))",
                e.code
            )
        })?;
        if spec == RepetitionsSpec::Fixed(0) {
            return Err("repetitions must be at least 1".into());
        }
        Ok(spec)
    }

    /// Sets a case's repetitions to this spec.
    pub fn apply(self, case: &mut Case) {
        match self {
            RepetitionsSpec::Fixed(n) => {
                case.repetitions = n;
                case.adaptive_repetitions = None;
            }
            RepetitionsSpec::Auto(a) => {
                case.repetitions = a.min;
                case.adaptive_repetitions = Some(a);
            }
        }
    }
}

/// The bare words after `gpu_batch_size:` and in `gpu_batch_sizes: [...]` must be `auto`: ron
/// gives a deserializer a bare word without its name, so they are checked in the text. `Err`:
/// (line, column, word) of the first other word.
fn check_batch_words(text: &str) -> Result<(), (usize, usize, String)> {
    let b = text.as_bytes();
    let pos = |i: usize| {
        let line = text[..i].matches('\n').count() + 1;
        let col = i - text[..i].rfind('\n').map_or(0, |n| n + 1) + 1;
        (line, col)
    };
    let word_at = |i: usize| -> Option<&str> {
        let end = b[i..]
            .iter()
            .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
            .map_or(b.len(), |n| i + n);
        (end > i && b[i].is_ascii_alphabetic()).then(|| &text[i..end])
    };
    let skip_ws = |mut i: usize| {
        while i < b.len() && (b[i] as char).is_whitespace() {
            i += 1;
        }
        i
    };
    let mut from = 0;
    while let Some(off) = text[from..].find("gpu_batch_size") {
        let start = from + off;
        let mut i = start + "gpu_batch_size".len();
        let list = b.get(i) == Some(&b's');
        if list {
            i += 1;
        }
        from = i;
        i = skip_ws(i);
        if b.get(i) != Some(&b':') {
            continue;
        }
        i = skip_ws(i + 1);
        let check = |i: usize| match word_at(i) {
            Some(w) if w != "auto" => {
                let (l, c) = pos(i);
                Err((l, c, w.to_string()))
            }
            _ => Ok(()),
        };
        if !list {
            check(i)?;
            continue;
        }
        if b.get(i) != Some(&b'[') {
            continue;
        }
        i += 1;
        while i < b.len() && b[i] != b']' {
            i = skip_ws(i);
            check(i)?;
            while i < b.len() && b[i] != b',' && b[i] != b']' {
                i += 1;
            }
            if i < b.len() && b[i] == b',' {
                i += 1;
            }
        }
    }
    Ok(())
}

/// `gpu_batch_size:` as written: a count, or `auto` (the backend chooses it before the case runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchSpec {
    Fixed(usize),
    Auto,
}

impl<'de> Deserialize<'de> for BatchSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BatchSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a batch size, or auto")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<BatchSpec, E> {
                usize::try_from(n)
                    .map(BatchSpec::Fixed)
                    .map_err(|_| E::custom(format!("batch size {n} is too large")))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<BatchSpec, E> {
                Err(E::custom(format!("batch size {n} is negative")))
            }
            // ron hands a bare word over as a unit, without its name: `check_batch_words`
            // has made sure the word is `auto` before parsing
            fn visit_unit<E: de::Error>(self) -> Result<BatchSpec, E> {
                Ok(BatchSpec::Auto)
            }
            // ron hands a bare identifier over as a unit variant or a string
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BatchSpec, E> {
                if v == "auto" {
                    Ok(BatchSpec::Auto)
                } else {
                    Err(E::custom(format!(
                        "`{v}` is not a batch size: write a number or auto"
                    )))
                }
            }
            fn visit_enum<A: de::EnumAccess<'de>>(self, a: A) -> Result<BatchSpec, A::Error> {
                use serde::de::VariantAccess;
                let (name, v): (String, _) = a.variant()?;
                v.unit_variant()?;
                self.visit_str(&name)
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for BatchSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSpec::Fixed(n) => write!(f, "{n}"),
            BatchSpec::Auto => f.write_str("auto"),
        }
    }
}

/// A per-case timeout in seconds, checked where it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TimeoutSecs(u64);

impl<'de> Deserialize<'de> for TimeoutSecs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        crate::case::check_timeout(n).map_err(serde::de::Error::custom)?;
        Ok(TimeoutSecs(n))
    }
}

#[derive(Debug, Clone, Copy)]
struct CutGenLen(usize);

impl<'de> Deserialize<'de> for CutGenLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = usize::deserialize(d)?;
        if n < 4 {
            return Err(serde::de::Error::custom(format!(
                "cut_gen_len {n} is below 4: the projection needs the prefill, two warm-up decode steps \
                 and at least one more; use 4 or more (or leave it out to run the full gen_len)"
            )));
        }
        Ok(CutGenLen(n))
    }
}

#[derive(Debug, Clone)]
struct CheckedPlacement(Placement);

impl<'de> Deserialize<'de> for CheckedPlacement {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let p = Placement::deserialize(d)?;
        if let Placement::Policy(policy) = &p {
            policy.validate().map_err(serde::de::Error::custom)?;
        }
        Ok(CheckedPlacement(p))
    }
}

// ---- expansion ----

/// What a grid cell or explicit case fixes; the rest comes from [`Defaults`].
struct Shape<'a> {
    model: &'a str,
    framework: &'a str,
    prompt_len: usize,
    gen_len: usize,
    cut: Option<usize>,
    gpu_batch_size: BatchSpec,
    placement: Placement,
}

/// The case of a shape, with built-in values for what neither the case, its grid nor the suite's
/// defaults set.
fn resolve_case(d: &Defaults, s: Shape) -> Case {
    let auto_batch = s.gpu_batch_size == BatchSpec::Auto;
    let auto_placement = s.placement == Placement::Auto;
    let mut case = Case {
        model: s.model.to_string(),
        framework: s.framework.to_string(),
        prompt_len: s.prompt_len,
        gen_len: s.gen_len,
        // Cutting at the full length is the same as not cutting (and keeps the id).
        cut_gen_len: s.cut.filter(|&c| c != s.gen_len),
        gpu_batch_size: match s.gpu_batch_size {
            BatchSpec::Fixed(n) => n,
            BatchSpec::Auto => 1,
        },
        // an auto batch is chosen with its number of GPU batches
        num_gpu_batches: if auto_batch {
            1
        } else {
            d.num_gpu_batches.unwrap_or(1)
        },
        placement: s.placement,
        device: d.device.unwrap_or(Device::Cuda),
        weights: d.weights.clone().unwrap_or(Weights::Dummy),
        num_nodes: d.num_nodes.unwrap_or(1),
        num_gpus_per_node: d.num_gpus_per_node.unwrap_or(1),
        warmup: d.warmup.unwrap_or(1),
        repetitions: 1,
        adaptive_repetitions: None,
        check_projection_at: None,
        timeout_s: d.timeout_s.map(|t| t.0),
        memory: d.memory,
        auto: (auto_batch || auto_placement).then_some(Auto {
            placement: auto_placement,
            gpu_batch_size: auto_batch,
            resolved: None,
        }),
    };
    d.repetitions
        .unwrap_or(RepetitionsSpec::Fixed(1))
        .apply(&mut case);
    case
}

struct Origin(String);
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl SuiteFile {
    fn expand(&self, frameworks: &Frameworks) -> Result<Vec<SuiteCase>> {
        let mut out = Vec::new();
        for (gi, grid) in self.grids.iter().enumerate() {
            let gname = match &grid.name {
                Some(n) => format!("grid `{n}` (grids[{gi}])"),
                None => format!("grids[{gi}]"),
            };
            self.expand_grid(grid, &gname, &mut out)?;
        }
        for (ci, spec) in self.cases.iter().enumerate() {
            let d = Defaults {
                device: spec.device,
                weights: spec.weights.clone(),
                warmup: spec.warmup,
                repetitions: spec.repetitions,
                timeout_s: spec.timeout_s,
                num_nodes: spec.num_nodes,
                num_gpus_per_node: spec.num_gpus_per_node,
                num_gpu_batches: spec.num_gpu_batches,
                memory: spec.memory,
            }
            .over(&self.defaults);
            let case = resolve_case(
                &d,
                Shape {
                    model: &spec.model.0,
                    framework: &spec.framework.0,
                    prompt_len: spec.prompt_len,
                    gen_len: spec.gen_len,
                    cut: spec.cut_gen_len.map(|c| c.0),
                    gpu_batch_size: spec.gpu_batch_size,
                    placement: spec.placement.0.clone(),
                },
            );
            out.push(SuiteCase {
                case,
                origin: format!(
                    "cases[{ci}] ({} {} prompt {})",
                    spec.model.0, spec.framework.0, spec.prompt_len
                ),
            });
        }

        for (ei, ex) in self.excludes.iter().enumerate() {
            if !out.iter().any(|c| ex.matches(&c.case)) {
                bail!("excludes[{ei}] matches no case\n  fix: correct or remove it");
            }
        }
        out.retain(|c| !self.excludes.iter().any(|ex| ex.matches(&c.case)));

        let mut seen: HashMap<String, String> = HashMap::new();
        for c in &out {
            c.case
                .validate()
                .and_then(|()| frameworks.check(&c.case))
                .map_err(|e| {
                    anyhow::anyhow!("{}: {e}\n  fix: change that case's values", c.origin)
                })?;
            if let Some(first) = seen.insert(c.case.id(), c.origin.clone()) {
                bail!(
                    "{} is the same case as {first} (id {})\n  fix: remove one of them, or add an exclude",
                    c.origin,
                    c.case.id()
                );
            }
        }
        Ok(out)
    }

    fn expand_grid(&self, grid: &Grid, gname: &str, out: &mut Vec<SuiteCase>) -> Result<()> {
        for (axis, empty) in [
            ("models", grid.models.is_empty()),
            ("prompt_lens", grid.prompt_lens.is_empty()),
            ("gen_lens", grid.gen_lens.is_empty()),
            ("frameworks", grid.frameworks.is_empty()),
        ] {
            if empty {
                bail!("{gname}: the `{axis}` axis is empty\n  fix: list at least one value");
            }
        }
        for (ki, cell) in grid.cells.iter().enumerate() {
            if cell.placement.is_some() && !grid.placements.is_empty() {
                bail!(
                    "{gname}: cells[{ki}] sets a placement but the grid also has a `placements` axis\n  \
                     fix: give placements either per cell or as the axis, not both"
                );
            }
            if !grid.models.is_empty()
                && cell
                    .model
                    .as_ref()
                    .is_some_and(|m| !grid.models.contains(m))
            {
                bail!(
                    "{gname}: cells[{ki}] names model `{}`, which is not on the `models` axis\n  fix: add it to `models` or remove the cell",
                    cell.model.as_ref().unwrap().0
                );
            }
        }
        for (ki, cell) in grid.cells.iter().enumerate() {
            let used = grid.frameworks.iter().any(|f| {
                grid.models.iter().any(|m| {
                    grid.prompt_lens
                        .iter()
                        .any(|&p| cell.matches(&f.0, &m.0, p))
                })
            });
            if !used {
                bail!(
                    "{gname}: cells[{ki}] matches no (framework, model, prompt_len) of the grid's axes\n  \
                     fix: correct its keys or remove it"
                );
            }
        }
        for m in grid.cut_gen_len.keys() {
            if !grid.models.contains(m) {
                bail!(
                    "{gname}: cut_gen_len names model `{}`, which is not on the `models` axis\n  fix: add it to `models` or remove the entry",
                    m.0
                );
            }
        }
        let axes = [
            ("models", grid.models.len()),
            ("prompt_lens", grid.prompt_lens.len()),
            ("gen_lens", grid.gen_lens.len()),
            ("frameworks", grid.frameworks.len()),
            ("gpu_batch_sizes", grid.gpu_batch_sizes.len().max(1)),
            ("placements", grid.placements.len().max(1)),
        ];
        // An upper bound (cells may fix batch and placement): counted before anything expands.
        let size = axes
            .iter()
            .try_fold(1usize, |p, (_, len)| p.checked_mul(*len))
            .and_then(|p| p.checked_add(out.len()));
        if size.is_none_or(|n| n > MAX_CASES) {
            let sizes: Vec<String> = axes
                .iter()
                .filter(|(_, len)| *len > 1)
                .map(|(axis, len)| format!("{axis} {len}"))
                .collect();
            bail!(
                "{gname} expands to {} cases ({}), over the limit of {MAX_CASES} for a suite\n  \
                 fix: shorten an axis or split the grid into suites",
                size.map_or("more than can be counted".to_string(), |n| n.to_string()),
                sizes.join(" x ")
            );
        }
        let d = grid.defaults.over(&self.defaults);
        for model in &grid.models {
            for &prompt_len in &grid.prompt_lens {
                for &gen_len in &grid.gen_lens {
                    for fw in &grid.frameworks {
                        let cell = grid
                            .cells
                            .iter()
                            .find(|c| c.matches(&fw.0, &model.0, prompt_len));
                        let where_ = || {
                            Origin(format!(
                                "{gname} cell (framework {}, model {}, prompt_len {prompt_len})",
                                fw.0, model.0
                            ))
                        };
                        let batches: Vec<BatchSpec> = match cell.and_then(|c| c.gpu_batch_size) {
                            Some(b) => vec![b],
                            None if !grid.gpu_batch_sizes.is_empty() => grid.gpu_batch_sizes.clone(),
                            None => bail!(
                                "{}: no batch size\n  fix: add a cell with gpu_batch_size for it, or a `gpu_batch_sizes` axis",
                                where_()
                            ),
                        };
                        let placements: Vec<Placement> = match cell.and_then(|c| c.placement.clone()) {
                            Some(p) => vec![p.0],
                            None if !grid.placements.is_empty() => {
                                grid.placements.iter().map(|p| p.0.clone()).collect()
                            }
                            None => bail!(
                                "{}: no placement\n  fix: add a cell with a placement for it, or a `placements` axis",
                                where_()
                            ),
                        };
                        let cut = cell
                            .and_then(|c| c.cut_gen_len)
                            .or_else(|| grid.cut_gen_len.get(model).copied())
                            .map(|c| c.0);
                        let mut cd = d.clone();
                        if let Some(n) = cell.and_then(|c| c.num_gpu_batches) {
                            cd.num_gpu_batches = Some(n);
                        }
                        for &bs in &batches {
                            for p in &placements {
                                let case = resolve_case(
                                    &cd,
                                    Shape {
                                        model: &model.0,
                                        framework: &fw.0,
                                        prompt_len,
                                        gen_len,
                                        cut,
                                        gpu_batch_size: bs,
                                        placement: p.clone(),
                                    },
                                );
                                out.push(SuiteCase {
                                    origin: format!("{} bs {bs} {}", where_(), p.label()),
                                    case,
                                });
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
