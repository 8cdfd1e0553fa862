//! The OPT layer math over any device: embeddings, the attention and MLP halves of a decoder
//! layer (pre-LN or post-LN), and the output head. The same code runs prefill and decode.

use anyhow::Result;
use bench_core::ModelConfig;

use super::weights::{GlobalWeights, LayerWeights};
use crate::device::{Activation, AttnShape, Device};

/// LayerNorm epsilon of every OPT model.
pub const LN_EPS: f32 = 1e-5;

/// Token embeddings (through project_in for opt-350m) plus learned positions: `[rows, hidden]`.
/// `positions` are indices into the position table (already offset by OPT's 2).
pub fn embed<D: Device>(
    dev: &D,
    g: &GlobalWeights<D::Tensor>,
    ids: &D::Tensor,
    positions: &D::Tensor,
) -> Result<D::Tensor> {
    let mut x = dev.gather_rows(&g.embed_tokens, ids)?;
    if let Some(p) = &g.project_in {
        x = dev.linear(&x, p, None, Activation::None)?;
    }
    dev.add_gathered_rows(&mut x, &g.embed_positions, positions)?;
    Ok(x)
}

/// The attention half of layer `w`, in place on `x` (`[batch * new_len, hidden]`); appends this
/// step's keys and values to the layer's cache.
#[allow(clippy::too_many_arguments)]
pub fn attention_block<D: Device>(
    dev: &D,
    cfg: &ModelConfig,
    w: &LayerWeights<D::Tensor>,
    x: &mut D::Tensor,
    k_cache: &mut D::Tensor,
    v_cache: &mut D::Tensor,
    mask: &D::Tensor,
    shape: AttnShape,
) -> Result<()> {
    let pre = cfg.do_layer_norm_before;
    let normed;
    let input = if pre {
        normed = dev.layer_norm(x, &w.attn_ln_w, &w.attn_ln_b, LN_EPS)?;
        &normed
    } else {
        &*x
    };
    let q = dev.linear(input, &w.q_w, Some(&w.q_b), Activation::None)?;
    let k = dev.linear(input, &w.k_w, Some(&w.k_b), Activation::None)?;
    let v = dev.linear(input, &w.v_w, Some(&w.v_b), Activation::None)?;
    dev.append_kv(k_cache, v_cache, &k, &v, shape)?;
    let a = dev.attention(&q, k_cache, v_cache, mask, shape)?;
    let o = dev.linear(&a, &w.o_w, Some(&w.o_b), Activation::None)?;
    dev.add_inplace(x, &o)?;
    if !pre {
        *x = dev.layer_norm(x, &w.attn_ln_w, &w.attn_ln_b, LN_EPS)?;
    }
    Ok(())
}

/// The MLP half of layer `w`, in place on `x`.
pub fn mlp_block<D: Device>(
    dev: &D,
    cfg: &ModelConfig,
    w: &LayerWeights<D::Tensor>,
    x: &mut D::Tensor,
) -> Result<()> {
    let pre = cfg.do_layer_norm_before;
    let normed;
    let input = if pre {
        normed = dev.layer_norm(x, &w.mlp_ln_w, &w.mlp_ln_b, LN_EPS)?;
        &normed
    } else {
        &*x
    };
    let f = dev.linear(input, &w.fc1_w, Some(&w.fc1_b), Activation::Relu)?;
    let o = dev.linear(&f, &w.fc2_w, Some(&w.fc2_b), Activation::None)?;
    dev.add_inplace(x, &o)?;
    if !pre {
        *x = dev.layer_norm(x, &w.mlp_ln_w, &w.mlp_ln_b, LN_EPS)?;
    }
    Ok(())
}

/// Logits of the last position of each sequence: `[batch, vocab]`.
pub fn head<D: Device>(
    dev: &D,
    g: &GlobalWeights<D::Tensor>,
    x: &D::Tensor,
    batch: usize,
    seq: usize,
) -> Result<D::Tensor> {
    let mut h = dev.last_rows(x, batch, seq)?;
    if let Some((w, b)) = &g.final_ln {
        h = dev.layer_norm(&h, w, b, LN_EPS)?;
    }
    if let Some(p) = &g.project_out {
        h = dev.linear(&h, p, None, Activation::None)?;
    }
    dev.linear(&h, g.lm_head(), None, Activation::None)
}
