//! `--filter key=value`: selects cases by the field names of the dry-run JSON.
//!
//! - `value` may be a comma list, any of which matches (`model=opt-6.7b,opt-30b`);
//! - several filters must all match;
//! - `placement` compares against [`Placement::label`](crate::Placement::label) (`gpu`, `cpu`,
//!   `disk`, or a policy label such as `20/80/0/100/0/100+cpu_attn`);
//! - dotted paths reach into objects: the placement's policy (`placement.cpu_attention=true`,
//!   `placement.compress_weight=true`; presets count as their equivalent policy) or the weights
//!   (`weights.checkpoint=/models/opt-1.3b`);
//! - derived keys: `batch_size` (gpu_batch_size x num_gpu_batches) and `tier` (the lowest tier
//!   holding weights or cache);
//! - `none` matches an absent optional value (`cut_gen_len=none`).

use anyhow::{bail, Result};
use serde_json::Value;

use crate::case::Case;
use crate::record::IdentifiedCase;

/// Keys that are not fields of the case JSON but may be filtered on.
pub const DERIVED_KEYS: &[&str] = &["batch_size", "tier"];

#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub path: Vec<String>,
    pub values: Vec<String>,
}

impl Filter {
    /// Parses `key=value[,value...]`, checking the key against the case fields.
    pub fn parse(text: &str) -> Result<Filter> {
        let Some((key, value)) = text.split_once('=') else {
            bail!("filter `{text}` is not key=value (e.g. --filter model=opt-6.7b)");
        };
        let path: Vec<String> = key
            .trim()
            .split('.')
            .map(|s| s.trim().to_string())
            .collect();
        let known = known_keys();
        if !known.iter().any(|k| k == &path[0]) {
            bail!(
                "filter `{text}`: unknown key `{}`; known keys: {}",
                path[0],
                known.join(", ")
            );
        }
        if path.iter().any(|p| p.is_empty()) {
            bail!(
                "filter `{text}`: empty part in the key (write e.g. placement.cpu_attention=true)"
            );
        }
        if path.len() > 1 {
            let parts = sub_keys(&path[0]);
            let sub = &path[1..].join(".");
            if !parts.contains(sub) {
                bail!(
                    "filter `{text}`: `{}` has {}",
                    path[0],
                    if parts.is_empty() {
                        "no parts to reach into".to_string()
                    } else {
                        format!("no part `{sub}`; its parts: {}", parts.join(", "))
                    }
                );
            }
        }
        let values: Vec<String> = value.split(',').map(|v| v.trim().to_string()).collect();
        if values.iter().any(|v| v.is_empty()) {
            bail!("filter `{text}` has an empty value");
        }
        Ok(Filter { path, values })
    }

    pub fn matches(&self, case: &Case) -> bool {
        match field(case, &self.path) {
            Some(v) => self.values.contains(&v),
            None => false,
        }
    }
}

/// True when every filter matches.
pub fn matches_all(filters: &[Filter], case: &Case) -> bool {
    filters.iter().all(|f| f.matches(case))
}

/// The keys `--filter` accepts at the top level.
pub fn known_keys() -> Vec<String> {
    let mut keys: Vec<String> = match IdentifiedCase::new(Case::example("any")).to_json() {
        Value::Object(m) => m.keys().cloned().collect(),
        _ => Vec::new(),
    };
    keys.extend(DERIVED_KEYS.iter().map(|s| s.to_string()));
    keys
}

/// The dotted parts a top-level key has: the policy's fields for `placement` (presets count as
/// their policy), `checkpoint` for `weights`; other keys are plain values.
fn sub_keys(key: &str) -> Vec<String> {
    let example = match key {
        "placement" => serde_json::to_value(crate::case::Policy::new([100, 0, 100, 0, 100, 0])),
        "weights" => serde_json::to_value(crate::case::Weights::Checkpoint("x".into())),
        _ => return Vec::new(),
    };
    match example {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// The text form of a case's field, as filters compare it.
pub fn field(case: &Case, path: &[String]) -> Option<String> {
    match path {
        [k] if k == "placement" => return Some(case.placement.label()),
        [k] if k == "batch_size" => return Some(case.batch_size().to_string()),
        [k] if k == "tier" => return Some(case.placement.lowest_tier().as_str().to_string()),
        [k, rest @ ..] if k == "placement" => {
            let policy = serde_json::to_value(case.placement.policy()).ok()?;
            return lookup(&policy, rest).map(text);
        }
        _ => {}
    }
    lookup(&IdentifiedCase::new(case.clone()).to_json(), path).map(text)
}

fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join("/"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::{Device, Placement, Policy, Weights};

    fn case(model: &str, prompt: usize, placement: Placement) -> Case {
        Case {
            model: model.into(),
            prompt_len: prompt,
            num_gpu_batches: 2,
            placement,
            device: Device::Cuda,
            ..Case::example("example")
        }
    }

    #[test]
    fn keys_values_and_paths() {
        let mut pol = Policy::new([20, 80, 0, 100, 0, 100]);
        pol.cpu_attention = true;
        let a = case("opt-30b", 512, Placement::Policy(pol));
        let b = case("opt-6.7b", 1024, Placement::Gpu);
        let f = |s: &str| Filter::parse(s).unwrap();
        assert!(f("model=opt-6.7b,opt-30b").matches(&a));
        assert!(!f("prompt_len=1024").matches(&a));
        assert!(f("placement=gpu").matches(&b));
        assert!(f("placement=20/80/0/100/0/100+cpu_attn").matches(&a));
        assert!(f("placement.cpu_attention=true").matches(&a));
        assert!(f("placement.cpu_attention=false").matches(&b));
        assert!(f("tier=cpu").matches(&a));
        assert!(f("batch_size=8").matches(&a));
        assert!(f("cut_gen_len=none").matches(&a));
        assert!(f("device=cuda").matches(&a));
        let mut c = b.clone();
        c.weights = Weights::Checkpoint("/m/opt".into());
        assert!(f("weights.checkpoint=/m/opt").matches(&c));
        assert!(f("weights=dummy").matches(&b));
        assert!(f(&format!("id={}", a.id())).matches(&a));
        let both = [f("model=opt-30b"), f("prompt_len=512,1024")];
        assert!(matches_all(&both, &a) && !matches_all(&both, &b));
    }

    #[test]
    fn bad_filters() {
        assert!(Filter::parse("model")
            .unwrap_err()
            .to_string()
            .contains("key=value"));
        let e = Filter::parse("modle=opt-30b").unwrap_err().to_string();
        assert!(
            e.contains("unknown key `modle`") && e.contains("prompt_len"),
            "{e}"
        );
        assert!(Filter::parse("model=").is_err());
        assert!(Filter::parse("placement..x=1").is_err());
        // A path that does not exist is named, not left to match nothing.
        let e = Filter::parse("placement.nosuch=true")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no part `nosuch`") && e.contains("cpu_attention"),
            "{e}"
        );
        let e = Filter::parse("prompt_len.x=1").unwrap_err().to_string();
        assert!(e.contains("`prompt_len` has no parts"), "{e}");
    }
}
