//! Batched generation: left padding, masks and positions exactly as transformers computes them,
//! a KV cache, greedy or temperature sampling, a stop token, logits for the last position only.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use bench_core::ModelConfig;

use crate::device::{AttnShape, Device, HostSlice, Sampling};
use crate::model::layers;
use crate::model::weights::WeightStore;

/// How tokens are picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SampleMode {
    Greedy,
    /// Softmax at `temperature`, uniforms drawn from a generator seeded with `seed`.
    Temperature {
        temperature: f32,
        seed: u64,
    },
}

#[derive(Debug, Clone)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    pub sample: SampleMode,
    /// Sequences that produce this token are finished: they get `pad_token_id` afterwards, and
    /// generation stops when all are finished (transformers' behaviour). `None` = run to length.
    pub stop_token: Option<u32>,
    /// Keep every step's logits (`[batch, vocab]` each) in the output.
    pub keep_logits: bool,
    /// Teacher forcing (scoring): each prompt's whole sequence. Every step's logits are scored
    /// against the sequence's next token (its negative log-likelihood goes to
    /// [`GenOutput::nll`]) and that token, not a sampled one, is fed next; past a sequence's end
    /// it is fed pads and nothing is scored.
    pub teacher: Option<Vec<Vec<u32>>>,
}

impl GenOptions {
    /// Greedy generation of `max_new_tokens` to the end (no stop token), no logits kept.
    pub fn greedy(max_new_tokens: usize) -> GenOptions {
        GenOptions {
            max_new_tokens,
            sample: SampleMode::Greedy,
            stop_token: None,
            keep_logits: false,
            teacher: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenOutput {
    /// New tokens per prompt (pads after a stop token, as transformers).
    pub new_tokens: Vec<Vec<u32>>,
    /// Wall time of each step (0 = prefill), from its start until its tokens are on the host.
    pub step_times_s: Vec<f64>,
    /// Per step, the `[batch, vocab]` logits (row-major), when asked for.
    pub logits: Vec<Vec<f32>>,
    /// With teacher forcing, per sequence: the sum of the scored tokens' negative
    /// log-likelihoods (natural log) and how many were scored.
    pub nll: Vec<(f64, usize)>,
}

/// Teacher forcing's step: each row's negative log-likelihood of its sequence's next token
/// added to `out.nll`, and the tokens to feed next. `rows` are the rows of `logits`
/// (`[rows.len(), vocab]`) within the batch.
pub(crate) fn teacher_step(
    teacher: &[Vec<u32>],
    prompts: &[Vec<u32>],
    rows: std::ops::Range<usize>,
    logits: &[f32],
    step: usize,
    pad: u32,
    out: &mut GenOutput,
) -> Result<Vec<u32>> {
    let n = rows.len();
    ensure!(
        n > 0 && logits.len().is_multiple_of(n),
        "teacher forcing: {} logits for {n} rows",
        logits.len()
    );
    let vocab = logits.len() / n;
    if out.nll.len() < teacher.len() {
        out.nll.resize(teacher.len(), (0.0, 0));
    }
    let mut next = Vec::with_capacity(n);
    for (b, row) in rows.zip(logits.chunks(vocab)) {
        let Some(&target) = teacher[b].get(prompts[b].len() + step) else {
            next.push(pad);
            continue;
        };
        ensure!(
            (target as usize) < vocab,
            "sequence {b} has token id {target}, outside the vocabulary of {vocab}"
        );
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        out.nll[b].0 += max + sum.ln() - row[target as usize] as f64;
        out.nll[b].1 += 1;
        next.push(target);
    }
    Ok(next)
}

/// Left-padded batch: token ids `[batch, seq]`, mask (1 real, 0 pad), positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    pub batch: usize,
    pub seq: usize,
    pub ids: Vec<u32>,
    pub mask: Vec<u32>,
    /// Indices into OPT's position table: cumsum(mask) * mask + 1 (pads 1, first real token 2),
    /// i.e. transformers' `(cumsum(mask) * mask - 1)` plus the table's offset of 2.
    pub positions: Vec<u32>,
}

impl PaddedBatch {
    pub fn new(prompts: &[Vec<u32>], pad: u32) -> PaddedBatch {
        let seq = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let batch = prompts.len();
        let (mut ids, mut mask, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        for p in prompts {
            let pad_len = seq - p.len();
            let mut count = 0;
            for i in 0..seq {
                let real = i >= pad_len;
                ids.push(if real { p[i - pad_len] } else { pad });
                mask.push(real as u32);
                count += real as u32;
                positions.push(count * real as u32 + 1);
            }
        }
        PaddedBatch {
            batch,
            seq,
            ids,
            mask,
            positions,
        }
    }
}

/// Checks prompts against the model: non-empty, ids in the vocabulary, room for the positions.
pub fn check_prompts(cfg: &ModelConfig, prompts: &[Vec<u32>], max_new_tokens: usize) -> Result<()> {
    ensure!(!prompts.is_empty(), "no prompts given");
    for (i, p) in prompts.iter().enumerate() {
        ensure!(!p.is_empty(), "prompt {i} is empty");
        if let Some(t) = p.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            anyhow::bail!(
                "prompt {i} has token id {t}, outside {}'s vocabulary of {}",
                cfg.name,
                cfg.vocab_size
            );
        }
        ensure!(
            p.len()
                .checked_add(max_new_tokens)
                .is_some_and(|n| n <= cfg.max_position_embeddings),
            "prompt {i} has {} tokens; with {max_new_tokens} new tokens that exceeds {}'s {} positions \
             (lower max_new_tokens)",
            p.len(),
            cfg.name,
            cfg.max_position_embeddings
        );
    }
    Ok(())
}

/// Teacher forcing's sequences must start with their prompts, one per prompt.
pub fn check_teacher(prompts: &[Vec<u32>], opts: &GenOptions) -> Result<()> {
    if let Some(t) = &opts.teacher {
        ensure!(
            t.len() == prompts.len(),
            "teacher forcing: {} sequences for {} prompts",
            t.len(),
            prompts.len()
        );
        for (i, (s, p)) in t.iter().zip(prompts).enumerate() {
            ensure!(
                s.starts_with(p),
                "teacher forcing: sequence {i} does not start with its prompt"
            );
        }
        ensure!(
            opts.stop_token.is_none(),
            "teacher forcing feeds every sequence to its end: no stop token"
        );
    }
    Ok(())
}

/// SplitMix64: the uniforms of temperature sampling, the same on every device and machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Runs generation for `prompts` (token ids, any lengths) with everything resident on `dev`.
pub fn generate<D: Device, W: WeightStore<D>>(
    dev: &D,
    cfg: &ModelConfig,
    weights: &W,
    prompts: &[Vec<u32>],
    opts: &GenOptions,
) -> Result<GenOutput> {
    check_prompts(cfg, prompts, opts.max_new_tokens)?;
    check_teacher(prompts, opts)?;
    let batch = PaddedBatch::new(prompts, cfg.pad_token_id);
    let (b, s) = (batch.batch, batch.seq);
    let (heads, hd) = (cfg.num_attention_heads, cfg.head_dim());
    let max_len = s + opts.max_new_tokens;
    let mut k_cache = Vec::with_capacity(cfg.num_hidden_layers);
    let mut v_cache = Vec::with_capacity(cfg.num_hidden_layers);
    for _ in 0..cfg.num_hidden_layers {
        k_cache.push(dev.alloc_kv(b, heads, max_len, hd)?);
        v_cache.push(dev.alloc_kv(b, heads, max_len, hd)?);
    }
    let mut rng = match opts.sample {
        SampleMode::Temperature { seed, .. } => Rng::new(seed),
        SampleMode::Greedy => Rng::new(0),
    };
    let mut out = GenOutput {
        new_tokens: vec![Vec::new(); b],
        ..Default::default()
    };
    let mut mask = batch.mask.clone(); // [b, s + step], rebuilt row-major each step
    let mut counts: Vec<u32> = batch.mask.chunks(s).map(|m| m.iter().sum()).collect();
    let mut unfinished = vec![true; b];
    let (mut ids, mut positions) = (batch.ids.clone(), batch.positions.clone());
    for step in 0..opts.max_new_tokens {
        let t0 = Instant::now();
        let (past, new) = if step == 0 { (0, s) } else { (s + step - 1, 1) };
        let total = past + new;
        let shape = AttnShape::new(b, heads, hd, past, new);
        let ids_t = dev.upload(HostSlice::U32(&ids), &[b * new])?;
        let pos_t = dev.upload(HostSlice::U32(&positions), &[b * new])?;
        let mask_t = dev.upload(HostSlice::U32(&mask), &[b, total])?;
        let mut x = layers::embed(dev, weights.globals(), &ids_t, &pos_t)?;
        for l in 0..cfg.num_hidden_layers {
            if l + 1 < cfg.num_hidden_layers {
                weights.prefetch(l + 1);
            }
            weights
                .with_layer(l, |w| {
                    layers::attention_block(
                        dev,
                        cfg,
                        &w.attn,
                        &mut x,
                        &mut k_cache[l],
                        &mut v_cache[l],
                        &mask_t,
                        shape,
                    )?;
                    layers::mlp_block(dev, cfg, &w.mlp, &mut x)
                })
                .with_context(|| format!("layer {l} of step {step}"))?;
        }
        let logits = layers::head(dev, weights.globals(), &x, b, new)?;
        let uniforms: Vec<f32>;
        let how = match opts.sample {
            SampleMode::Greedy => Sampling::Greedy,
            SampleMode::Temperature { temperature, .. } => {
                uniforms = (0..b).map(|_| rng.uniform()).collect();
                Sampling::Temperature {
                    temperature,
                    uniforms: &uniforms,
                }
            }
        };
        let mut next = match &opts.teacher {
            Some(t) => {
                let l = dev.download_f32(&logits)?;
                teacher_step(t, prompts, 0..b, &l, step, cfg.pad_token_id, &mut out)?
            }
            None => dev.sample(&logits, &how)?,
        };
        if opts.keep_logits {
            out.logits.push(dev.download_f32(&logits)?);
        }
        out.step_times_s.push(t0.elapsed().as_secs_f64());
        let step = StepEnd {
            pad: cfg.pad_token_id,
            stop: opts.stop_token,
            total,
        };
        match step.apply(&mut next, &mut unfinished, &mut mask, &mut counts, &mut out) {
            Some(p) => positions = p,
            None => break,
        }
        ids = next;
    }
    Ok(out)
}

/// The end of a generation step, shared by the resident and the offloaded loop.
pub(crate) struct StepEnd {
    pub pad: u32,
    pub stop: Option<u32>,
    /// Positions the mask covers this step.
    pub total: usize,
}

impl StepEnd {
    /// Records the sampled tokens (pads for sequences that already stopped) and, unless every
    /// sequence has stopped, extends the mask by one real position per sequence and returns the
    /// next step's positions.
    pub(crate) fn apply(
        &self,
        next: &mut [u32],
        unfinished: &mut [bool],
        mask: &mut Vec<u32>,
        counts: &mut [u32],
        out: &mut GenOutput,
    ) -> Option<Vec<u32>> {
        for (i, t) in next.iter_mut().enumerate() {
            if !unfinished[i] {
                *t = self.pad;
            } else if Some(*t) == self.stop {
                unfinished[i] = false;
            }
            out.new_tokens[i].push(*t);
        }
        if !unfinished.iter().any(|&u| u) {
            return None;
        }
        let mut m2 = Vec::with_capacity(counts.len() * (self.total + 1));
        for (i, row) in mask.chunks(self.total).enumerate() {
            m2.extend_from_slice(row);
            m2.push(1);
            counts[i] += 1;
        }
        *mask = m2;
        Some(counts.iter().map(|c| c + 1).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_and_positions_match_transformers() {
        let b = PaddedBatch::new(&[vec![5, 6, 7], vec![9]], 1);
        assert_eq!(b.ids, vec![5, 6, 7, 1, 1, 9]);
        assert_eq!(b.mask, vec![1, 1, 1, 0, 0, 1]);
        // pads get 1, the first real token 2 (OPT's offset of 2 on cumsum - 1)
        assert_eq!(b.positions, vec![2, 3, 4, 1, 1, 2]);
    }

    #[test]
    fn prompt_checks() {
        let cfg = bench_core::model::lookup("opt-tiny").unwrap();
        assert!(check_prompts(&cfg, &[vec![3; 500]], 20)
            .unwrap_err()
            .to_string()
            .contains("positions"));
        assert!(check_prompts(&cfg, &[vec![3000]], 2)
            .unwrap_err()
            .to_string()
            .contains("vocabulary"));
        assert!(check_prompts(&cfg, &[vec![]], 2).is_err());
        assert!(check_prompts(&cfg, &[vec![3; 10]], 2).is_ok());
    }
}
