//! OPT's tensors by name and shape, as HuggingFace's `OPTForCausalLM` saves them: the one list
//! that the dummy-checkpoint writer, the engine's loader and its offloader all read, so the three
//! can never disagree on a name, a shape or an order.
//!
//! Linear weights are `[out, in]`. A layer's tensors come in two halves (attention, then MLP),
//! because the offloader's `sep_layer` schedule fetches them separately.

use super::ModelConfig;

/// One tensor: HuggingFace name (with the `model.` prefix) and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    fn new(name: String, shape: Vec<usize>) -> TensorSpec {
        TensorSpec { name, shape }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where the decoder's tensors live in a checkpoint saved from `OPTForCausalLM`.
pub const PREFIX: &str = "model.decoder";
/// The untied output projection's name (usually absent: OPT ties it to `embed_tokens`).
pub const LM_HEAD: &str = "lm_head.weight";
/// Tensors of a layer's attention half; the MLP half holds the other [`MLP_TENSORS`].
pub const ATTN_TENSORS: usize = 10;
pub const MLP_TENSORS: usize = 6;

/// Layer `i`'s tensors: the attention half (q, k, v, out projections with biases, then its layer
/// norm), then the MLP half (fc1, fc2 with biases, then the layer's final layer norm).
pub fn layer_tensors(cfg: &ModelConfig, i: usize) -> Vec<TensorSpec> {
    let (h, f) = (cfg.hidden_size, cfg.ffn_dim);
    let l = format!("{PREFIX}.layers.{i}");
    let mut v = Vec::with_capacity(ATTN_TENSORS + MLP_TENSORS);
    for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        v.push(TensorSpec::new(
            format!("{l}.self_attn.{p}.weight"),
            vec![h, h],
        ));
        v.push(TensorSpec::new(format!("{l}.self_attn.{p}.bias"), vec![h]));
    }
    v.push(TensorSpec::new(
        format!("{l}.self_attn_layer_norm.weight"),
        vec![h],
    ));
    v.push(TensorSpec::new(
        format!("{l}.self_attn_layer_norm.bias"),
        vec![h],
    ));
    v.push(TensorSpec::new(format!("{l}.fc1.weight"), vec![f, h]));
    v.push(TensorSpec::new(format!("{l}.fc1.bias"), vec![f]));
    v.push(TensorSpec::new(format!("{l}.fc2.weight"), vec![h, f]));
    v.push(TensorSpec::new(format!("{l}.fc2.bias"), vec![h]));
    v.push(TensorSpec::new(
        format!("{l}.final_layer_norm.weight"),
        vec![h],
    ));
    v.push(TensorSpec::new(
        format!("{l}.final_layer_norm.bias"),
        vec![h],
    ));
    v
}

/// The token embedding (`[vocab, word_embed_proj_dim]`).
pub fn embed_tokens(cfg: &ModelConfig) -> TensorSpec {
    TensorSpec::new(
        format!("{PREFIX}.embed_tokens.weight"),
        vec![cfg.vocab_size, cfg.word_embed_proj_dim],
    )
}

/// The learned positions (`[max_positions + 2, hidden]`: OPT offsets positions by 2).
pub fn embed_positions(cfg: &ModelConfig) -> TensorSpec {
    TensorSpec::new(
        format!("{PREFIX}.embed_positions.weight"),
        vec![cfg.max_position_embeddings + 2, cfg.hidden_size],
    )
}

/// opt-350m's projections between the embedding width and the hidden size: (in, out).
pub fn projections(cfg: &ModelConfig) -> Option<(TensorSpec, TensorSpec)> {
    let (h, e) = (cfg.hidden_size, cfg.word_embed_proj_dim);
    (e != h).then(|| {
        (
            TensorSpec::new(format!("{PREFIX}.project_in.weight"), vec![h, e]),
            TensorSpec::new(format!("{PREFIX}.project_out.weight"), vec![e, h]),
        )
    })
}

/// The decoder's final layer norm (weight, bias); post-LN models have none.
pub fn final_layer_norm(cfg: &ModelConfig) -> Option<(TensorSpec, TensorSpec)> {
    let h = cfg.hidden_size;
    cfg.do_layer_norm_before.then(|| {
        (
            TensorSpec::new(format!("{PREFIX}.final_layer_norm.weight"), vec![h]),
            TensorSpec::new(format!("{PREFIX}.final_layer_norm.bias"), vec![h]),
        )
    })
}

/// An untied output projection, shaped as the token embedding it would otherwise share.
pub fn lm_head(cfg: &ModelConfig) -> TensorSpec {
    TensorSpec::new(LM_HEAD.into(), embed_tokens(cfg).shape)
}

/// What the input step reads: token embedding, positions, and `project_in` where there is one.
pub fn input_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let mut v = vec![embed_tokens(cfg), embed_positions(cfg)];
    v.extend(projections(cfg).map(|(p_in, _)| p_in));
    v
}

/// What the output step reads besides a tied head: the final layer norm, `project_out`, and
/// `lm_head` when the checkpoint has its own.
pub fn output_tensors(cfg: &ModelConfig, untied_lm_head: bool) -> Vec<TensorSpec> {
    let mut v = Vec::new();
    if let Some((w, b)) = final_layer_norm(cfg) {
        v.extend([w, b]);
    }
    v.extend(projections(cfg).map(|(_, p_out)| p_out));
    if untied_lm_head {
        v.push(lm_head(cfg));
    }
    v
}

/// Every tensor of a tied checkpoint, in the order flexbench's dummy checkpoints store them:
/// embeddings, projections, final layer norm, then the layers.
pub fn checkpoint_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let mut out = vec![embed_tokens(cfg), embed_positions(cfg)];
    if let Some((p_in, p_out)) = projections(cfg) {
        out.extend([p_in, p_out]);
    }
    if let Some((w, b)) = final_layer_norm(cfg) {
        out.extend([w, b]);
    }
    for i in 0..cfg.num_hidden_layers {
        out.extend(layer_tensors(cfg, i));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lookup;

    #[test]
    fn checkpoint_holds_each_step_s_tensors_once() {
        for name in ["opt-tiny", "opt-tiny-postln", "opt-350m"] {
            let cfg = lookup(name).unwrap();
            let all = checkpoint_tensors(&cfg);
            let mut by_step: Vec<TensorSpec> = input_tensors(&cfg);
            for i in 0..cfg.num_hidden_layers {
                by_step.extend(layer_tensors(&cfg, i));
            }
            by_step.extend(output_tensors(&cfg, false));
            let mut a: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
            let mut b: Vec<&str> = by_step.iter().map(|t| t.name.as_str()).collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{name}");
        }
        let cfg = lookup("opt-350m").unwrap();
        let first: Vec<String> = checkpoint_tensors(&cfg)
            .into_iter()
            .take(4)
            .map(|t| t.name)
            .collect();
        assert_eq!(
            first,
            [
                "model.decoder.embed_tokens.weight",
                "model.decoder.embed_positions.weight",
                "model.decoder.project_in.weight",
                "model.decoder.project_out.weight"
            ]
        );
        assert_eq!(embed_tokens(&cfg).shape, vec![50272, 512]);
        assert_eq!(output_tensors(&cfg, true).last().unwrap().name, LM_HEAD);
        let layer = layer_tensors(&cfg, 3);
        assert_eq!(layer.len(), ATTN_TENSORS + MLP_TENSORS);
        assert!(layer[ATTN_TENSORS].name.ends_with("layers.3.fc1.weight"));
        assert_eq!(layer[ATTN_TENSORS].shape, vec![4096, 1024]);
    }
}
