//! The OPT layer math over any device: embeddings, the attention and MLP halves of a decoder
//! layer (pre-LN or post-LN), and the output head. The same code runs prefill and decode.

use std::borrow::Borrow;

use anyhow::Result;
use bench_core::ModelConfig;

use super::weights::{AttnWeights, GlobalWeights, MlpWeights};
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
    embed_with(
        dev,
        &g.embed_tokens,
        &g.embed_positions,
        g.project_in.as_ref(),
        ids,
        positions,
    )
}

/// [`embed`] from the tensors themselves (the offloader fetches them as a unit of their own).
pub fn embed_with<D: Device>(
    dev: &D,
    embed_tokens: &D::Tensor,
    embed_positions: &D::Tensor,
    project_in: Option<&D::Tensor>,
    ids: &D::Tensor,
    positions: &D::Tensor,
) -> Result<D::Tensor> {
    let mut x = dev.gather_rows(embed_tokens, ids)?;
    if let Some(p) = project_in {
        x = dev.linear(&x, p, None, Activation::None)?;
    }
    dev.add_gathered_rows(&mut x, embed_positions, positions)?;
    Ok(x)
}

/// The attention half of a layer (weights `w`), in place on `x` (`[batch * new_len, hidden]`); appends this
/// step's keys and values to the layer's cache.
#[allow(clippy::too_many_arguments)]
pub fn attention_block<D: Device, B: Borrow<D::Tensor>>(
    dev: &D,
    cfg: &ModelConfig,
    w: &AttnWeights<B>,
    x: &mut D::Tensor,
    k_cache: &mut D::Tensor,
    v_cache: &mut D::Tensor,
    mask: &D::Tensor,
    shape: AttnShape,
) -> Result<()> {
    let (q, k, v) = attn_qkv(dev, cfg, w, x)?;
    dev.append_kv(k_cache, v_cache, &k, &v, shape)?;
    let a = dev.attention_with_new(&q, &k, &v, k_cache, v_cache, mask, shape)?;
    attn_out(dev, cfg, w, x, &a)
}

/// The first part of the attention half: q, k and v of `x` (after the layer norm on pre-LN).
pub fn attn_qkv<D: Device, B: Borrow<D::Tensor>>(
    dev: &D,
    cfg: &ModelConfig,
    w: &AttnWeights<B>,
    x: &D::Tensor,
) -> Result<(D::Tensor, D::Tensor, D::Tensor)> {
    let normed;
    let input = if cfg.do_layer_norm_before {
        normed = dev.layer_norm(x, w.ln_w.borrow(), w.ln_b.borrow(), LN_EPS)?;
        &normed
    } else {
        x
    };
    let mut qkv = dev
        .linear_shared_input(
            input,
            &[
                (w.q_w.borrow(), Some(w.q_b.borrow())),
                (w.k_w.borrow(), Some(w.k_b.borrow())),
                (w.v_w.borrow(), Some(w.v_b.borrow())),
            ],
        )?
        .into_iter();
    let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
        anyhow::bail!("linear_shared_input returned fewer than three products");
    };
    Ok((q, k, v))
}

/// The last part of the attention half: `x += out_proj(a)` (then the layer norm on post-LN).
pub fn attn_out<D: Device, B: Borrow<D::Tensor>>(
    dev: &D,
    cfg: &ModelConfig,
    w: &AttnWeights<B>,
    x: &mut D::Tensor,
    a: &D::Tensor,
) -> Result<()> {
    let o = dev.linear(a, w.o_w.borrow(), Some(w.o_b.borrow()), Activation::None)?;
    dev.add_inplace(x, &o)?;
    if !cfg.do_layer_norm_before {
        *x = dev.layer_norm(x, w.ln_w.borrow(), w.ln_b.borrow(), LN_EPS)?;
    }
    Ok(())
}

/// The MLP half of a layer (weights `w`), in place on `x`.
pub fn mlp_block<D: Device, B: Borrow<D::Tensor>>(
    dev: &D,
    cfg: &ModelConfig,
    w: &MlpWeights<B>,
    x: &mut D::Tensor,
) -> Result<()> {
    let pre = cfg.do_layer_norm_before;
    let normed;
    let input = if pre {
        normed = dev.layer_norm(x, w.ln_w.borrow(), w.ln_b.borrow(), LN_EPS)?;
        &normed
    } else {
        &*x
    };
    let f = dev.linear(
        input,
        w.fc1_w.borrow(),
        Some(w.fc1_b.borrow()),
        Activation::Relu,
    )?;
    let o = dev.linear(
        &f,
        w.fc2_w.borrow(),
        Some(w.fc2_b.borrow()),
        Activation::None,
    )?;
    dev.add_inplace(x, &o)?;
    if !pre {
        *x = dev.layer_norm(x, w.ln_w.borrow(), w.ln_b.borrow(), LN_EPS)?;
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
    let ln = g.final_ln.as_ref().map(|(w, b)| (w, b));
    head_with(dev, ln, g.project_out.as_ref(), g.lm_head(), x, batch, seq)
}

/// [`head`] from the tensors themselves.
pub fn head_with<D: Device>(
    dev: &D,
    final_ln: Option<(&D::Tensor, &D::Tensor)>,
    project_out: Option<&D::Tensor>,
    lm_head: &D::Tensor,
    x: &D::Tensor,
    batch: usize,
    seq: usize,
) -> Result<D::Tensor> {
    let mut h = dev.last_rows(x, batch, seq)?;
    if let Some((w, b)) = final_ln {
        h = dev.layer_norm(&h, w, b, LN_EPS)?;
    }
    if let Some(p) = project_out {
        h = dev.linear(&h, p, None, Activation::None)?;
    }
    dev.linear(&h, lm_head, None, Activation::None)
}
