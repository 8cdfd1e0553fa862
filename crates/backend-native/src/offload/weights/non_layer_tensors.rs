//! The tensors outside the decoder layers, by the schedule unit that fetches them: the input
//! embedding's (token and position tables, `project_in`) and the output head's (final layer
//! norm, `project_out`, `lm_head`), as (name, shape).
//!
//! The same list is also written in `dummy.rs` and `model/weights.rs`; it stays whole here, in
//! one place, until the three are unified in bench-core.

use bench_core::ModelConfig;

/// The input embedding unit's tensors, in the order the schedule's embedding reads them.
pub fn input_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, e, v) = (cfg.hidden_size, cfg.word_embed_proj_dim, cfg.vocab_size);
    let p = "model.decoder";
    let mut input = vec![
        (format!("{p}.embed_tokens.weight"), vec![v, e]),
        (
            format!("{p}.embed_positions.weight"),
            vec![cfg.max_position_embeddings + 2, h],
        ),
    ];
    if e != h {
        input.push((format!("{p}.project_in.weight"), vec![h, e]));
    }
    input
}

/// The output head unit's own tensors, in the order the schedule's head reads them. Without
/// `has_lm_head` the head is tied: the plan appends the input's `embed_tokens` instead.
pub fn output_tensors(cfg: &ModelConfig, has_lm_head: bool) -> Vec<(String, Vec<usize>)> {
    let (h, e, v) = (cfg.hidden_size, cfg.word_embed_proj_dim, cfg.vocab_size);
    let p = "model.decoder";
    let mut out = Vec::new();
    if cfg.do_layer_norm_before {
        out.push((format!("{p}.final_layer_norm.weight"), vec![h]));
        out.push((format!("{p}.final_layer_norm.bias"), vec![h]));
    }
    if e != h {
        out.push((format!("{p}.project_out.weight"), vec![e, h]));
    }
    if has_lm_head {
        out.push(("lm_head.weight".into(), vec![v, e]));
    }
    out
}
