//! The compression section of report.md: every case run with 4-bit weights, 4-bit cache or
//! sparse attention beside its twin without them (the same case with those flags off), so that
//! what compression buys and costs reads off one row: decode and total throughput, the disk
//! bytes read per generated token, and the memory peaks of the tiers.

use std::fmt::Write as _;

use bench_core::{Case, Placement, Record};

use crate::fields::{md_escape, num};

/// The case with compression and sparsity off.
fn twin_of(c: &Case) -> Case {
    let mut p = c.placement.policy();
    p.compress_weight = false;
    p.compress_cache = false;
    p.attn_sparsity = 1.0;
    Case {
        placement: Placement::Policy(p),
        ..c.clone()
    }
}

/// What the flags add to the twin's placement label (`+cw`, `+cc`, `+sparse0.1`).
fn variant(c: &Case) -> String {
    let p = c.placement.policy();
    let mut s = String::new();
    if p.compress_weight {
        s.push_str("+cw");
    }
    if p.compress_cache {
        s.push_str("+cc");
    }
    if p.attn_sparsity < 1.0 {
        s.push_str(&format!("+sparse{}", p.attn_sparsity));
    }
    s
}

/// Disk bytes read per generated token (the last repetition's counters).
fn disk_per_token(r: &Record) -> Option<f64> {
    let raw = r.raw.as_ref()?;
    let read = *raw.bytes_moved.get("disk_read")?;
    (raw.generated_tokens > 0).then(|| read as f64 / raw.generated_tokens as f64)
}

fn peak(r: &Record, tier: &str) -> Option<u64> {
    r.raw.as_ref()?.peak_memory_bytes.get(tier).copied()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn mib(v: Option<u64>) -> String {
    v.map_or("-".into(), |b| {
        format!("{:.0}", b as f64 / (1u64 << 20) as f64)
    })
}

/// The section, or nothing when no case compresses.
pub fn section(recs: &[Record]) -> String {
    let variants: Vec<&Record> = recs
        .iter()
        .filter(|r| !variant(&r.case.case).is_empty())
        .collect();
    if variants.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    let _ = writeln!(s, "## Compression\n");
    let _ = writeln!(
        s,
        "Each case with 4-bit weights (+cw), 4-bit KV cache (+cc) or sparse attention beside its \
         twin without them: decode and total throughput (token/s) and their ratio, disk MiB read \
         per generated token, and peak MiB per tier (compute / host / disk) of the twin and the \
         variant. A variant without a twin in these results shows `-`.\n"
    );
    let _ = writeln!(
        s,
        "| model, prompt, batch | placement | variant | decode tok/s | decode ratio | total tok/s | total ratio | disk read / token | peak MiB compute / host / disk |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in variants {
        let c = &r.case.case;
        let want = twin_of(c);
        let twin = recs.iter().find(|t| t.case.case == want);
        let m = r.metrics.as_ref();
        let tm = twin.and_then(|t| t.metrics.as_ref());
        let pair = |f: fn(&bench_core::metrics::Metrics) -> f64| {
            let show =
                |x: Option<&bench_core::metrics::Metrics>, rec: Option<&Record>| match (x, rec) {
                    (Some(x), _) => num(f(x)),
                    (None, Some(rec)) => rec.outcome.as_str().to_uppercase(),
                    (None, None) => "-".into(),
                };
            (
                format!("{} → {}", show(tm, twin), show(m, Some(r))),
                ratio(m.map(f), tm.map(f)),
            )
        };
        let (dec, dec_r) = pair(|m| m.decode_throughput);
        let (tot, tot_r) = pair(|m| m.total_throughput);
        let disk = match (twin.and_then(disk_per_token), disk_per_token(r)) {
            (Some(a), Some(b)) if a > 0.0 || b > 0.0 => {
                let m = |v: f64| format!("{:.2}", v / (1u64 << 20) as f64);
                format!("{} → {} MiB ({})", m(a), m(b), ratio(Some(b), Some(a)))
            }
            _ => "-".into(),
        };
        let peaks = |rec: Option<&Record>| {
            ["compute", "host", "disk"]
                .map(|t| mib(rec.and_then(|x| peak(x, t))))
                .join(" / ")
        };
        let _ = writeln!(
            s,
            "| {} {}, bs {} | {} | {} | {dec} | {dec_r} | {tot} | {tot_r} | {disk} | {} → {} |",
            c.model,
            c.prompt_len,
            c.batch_size(),
            md_escape(&want.placement.label()),
            variant(c),
            peaks(twin),
            peaks(Some(r))
        );
    }
    s.push('\n');
    s
}
