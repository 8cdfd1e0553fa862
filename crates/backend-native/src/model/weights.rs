//! Weights on the compute device, and the store through which generation reaches them.

use anyhow::{Context, Result};
use bench_core::ModelConfig;

use super::checkpoint::TensorSource;
use crate::device::{Device, DeviceTensor, HostSlice};

/// One decoder layer's tensors (HF names in comments). Linear weights are `[out, in]`.
pub struct LayerWeights<T> {
    pub q_w: T, // self_attn.q_proj
    pub q_b: T,
    pub k_w: T, // self_attn.k_proj
    pub k_b: T,
    pub v_w: T, // self_attn.v_proj
    pub v_b: T,
    pub o_w: T, // self_attn.out_proj
    pub o_b: T,
    pub attn_ln_w: T, // self_attn_layer_norm
    pub attn_ln_b: T,
    pub fc1_w: T,
    pub fc1_b: T,
    pub fc2_w: T,
    pub fc2_b: T,
    pub mlp_ln_w: T, // final_layer_norm (of the layer)
    pub mlp_ln_b: T,
}

/// The tensors outside the layers.
pub struct GlobalWeights<T> {
    pub embed_tokens: T,    // [vocab, word_embed_proj_dim]
    pub embed_positions: T, // [max_positions + 2, hidden]
    pub project_in: Option<T>,
    pub project_out: Option<T>,
    /// The decoder's final layer norm (pre-LN models only).
    pub final_ln: Option<(T, T)>,
    /// `None` when tied to `embed_tokens` (OPT's usual case).
    pub lm_head: Option<T>,
}

impl<T> GlobalWeights<T> {
    pub fn lm_head(&self) -> &T {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}

/// (suffix, shape) of every tensor of layer weights, in [`LayerWeights`] field order.
pub fn layer_tensor_names(cfg: &ModelConfig, i: usize) -> Vec<(String, Vec<usize>)> {
    let (h, f) = (cfg.hidden_size, cfg.ffn_dim);
    let l = format!("model.decoder.layers.{i}");
    let mut v = Vec::new();
    for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        v.push((format!("{l}.self_attn.{p}.weight"), vec![h, h]));
        v.push((format!("{l}.self_attn.{p}.bias"), vec![h]));
    }
    v.push((format!("{l}.self_attn_layer_norm.weight"), vec![h]));
    v.push((format!("{l}.self_attn_layer_norm.bias"), vec![h]));
    v.push((format!("{l}.fc1.weight"), vec![f, h]));
    v.push((format!("{l}.fc1.bias"), vec![f]));
    v.push((format!("{l}.fc2.weight"), vec![h, f]));
    v.push((format!("{l}.fc2.bias"), vec![h]));
    v.push((format!("{l}.final_layer_norm.weight"), vec![h]));
    v.push((format!("{l}.final_layer_norm.bias"), vec![h]));
    v
}

fn upload<D: Device>(
    dev: &D,
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
) -> Result<D::Tensor> {
    let data = src.load_f16(name, shape)?;
    dev.upload(HostSlice::F16(&data), shape)
        .with_context(|| format!("uploading {name} to {}", dev.name()))
}

/// Loads layer `i` from `src` onto `dev`.
pub fn load_layer<D: Device>(
    dev: &D,
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    i: usize,
) -> Result<LayerWeights<D::Tensor>> {
    let mut t = layer_tensor_names(cfg, i)
        .into_iter()
        .map(|(n, s)| upload(dev, src, &n, &s))
        .collect::<Result<Vec<_>>>()?
        .into_iter();
    let mut next = || t.next().expect("layer_tensor_names lists 16 tensors");
    Ok(LayerWeights {
        q_w: next(),
        q_b: next(),
        k_w: next(),
        k_b: next(),
        v_w: next(),
        v_b: next(),
        o_w: next(),
        o_b: next(),
        attn_ln_w: next(),
        attn_ln_b: next(),
        fc1_w: next(),
        fc1_b: next(),
        fc2_w: next(),
        fc2_b: next(),
        mlp_ln_w: next(),
        mlp_ln_b: next(),
    })
}

/// Loads the non-layer tensors from `src` onto `dev`.
pub fn load_globals<D: Device>(
    dev: &D,
    src: &dyn TensorSource,
    cfg: &ModelConfig,
) -> Result<GlobalWeights<D::Tensor>> {
    let (h, e, v) = (cfg.hidden_size, cfg.word_embed_proj_dim, cfg.vocab_size);
    let p = "model.decoder";
    let projected = e != h;
    Ok(GlobalWeights {
        embed_tokens: upload(dev, src, &format!("{p}.embed_tokens.weight"), &[v, e])?,
        embed_positions: upload(
            dev,
            src,
            &format!("{p}.embed_positions.weight"),
            &[cfg.max_position_embeddings + 2, h],
        )?,
        project_in: if projected {
            Some(upload(
                dev,
                src,
                &format!("{p}.project_in.weight"),
                &[h, e],
            )?)
        } else {
            None
        },
        project_out: if projected {
            Some(upload(
                dev,
                src,
                &format!("{p}.project_out.weight"),
                &[e, h],
            )?)
        } else {
            None
        },
        final_ln: if cfg.do_layer_norm_before {
            Some((
                upload(dev, src, &format!("{p}.final_layer_norm.weight"), &[h])?,
                upload(dev, src, &format!("{p}.final_layer_norm.bias"), &[h])?,
            ))
        } else {
            None
        },
        lm_head: if src.contains("lm_head.weight") {
            Some(upload(dev, src, "lm_head.weight", &[v, e])?)
        } else {
            None
        },
    })
}

/// How generation reaches weights. [`ModelWeights`] keeps everything on the compute device; the
/// offloader implements it with tiers, fetching layers ahead of use.
pub trait WeightStore<D: Device> {
    fn globals(&self) -> &GlobalWeights<D::Tensor>;
    /// Runs `f` with layer `i`'s weights on the compute device (waiting for a fetch if needed).
    fn with_layer<R>(
        &self,
        i: usize,
        f: impl FnOnce(&LayerWeights<D::Tensor>) -> Result<R>,
    ) -> Result<R>;
    /// A hint that layer `i` is needed next; stores that fetch ahead start here.
    fn prefetch(&self, _i: usize) {}
}

/// The whole model resident on the compute device.
pub struct ModelWeights<T> {
    pub globals: GlobalWeights<T>,
    pub layers: Vec<LayerWeights<T>>,
}

impl<T: DeviceTensor> ModelWeights<T> {
    /// Loads every tensor of `cfg` from `src` onto `dev`.
    pub fn load<D: Device<Tensor = T>>(
        dev: &D,
        src: &dyn TensorSource,
        cfg: &ModelConfig,
    ) -> Result<ModelWeights<T>> {
        let globals = load_globals(dev, src, cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| load_layer(dev, src, cfg, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelWeights { globals, layers })
    }

    /// Bytes of all tensors on the device.
    pub fn size_bytes(&self) -> usize {
        let g = &self.globals;
        let mut n = g.embed_tokens.size_bytes() + g.embed_positions.size_bytes();
        for t in [&g.project_in, &g.project_out, &g.lm_head]
            .into_iter()
            .flatten()
        {
            n += t.size_bytes();
        }
        if let Some((a, b)) = &g.final_ln {
            n += a.size_bytes() + b.size_bytes();
        }
        for l in &self.layers {
            for t in [
                &l.q_w,
                &l.q_b,
                &l.k_w,
                &l.k_b,
                &l.v_w,
                &l.v_b,
                &l.o_w,
                &l.o_b,
                &l.attn_ln_w,
                &l.attn_ln_b,
                &l.fc1_w,
                &l.fc1_b,
                &l.fc2_w,
                &l.fc2_b,
                &l.mlp_ln_w,
                &l.mlp_ln_b,
            ] {
                n += t.size_bytes();
            }
        }
        n
    }
}

impl<D: Device> WeightStore<D> for ModelWeights<D::Tensor> {
    fn globals(&self) -> &GlobalWeights<D::Tensor> {
        &self.globals
    }
    fn with_layer<R>(
        &self,
        i: usize,
        f: impl FnOnce(&LayerWeights<D::Tensor>) -> Result<R>,
    ) -> Result<R> {
        f(&self.layers[i])
    }
}
