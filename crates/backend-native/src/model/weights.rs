//! Weights on the compute device, and the store through which generation reaches them.

use anyhow::{Context, Result};
use bench_core::ModelConfig;

use bench_core::model::layout;

use super::checkpoint::TensorSource;
use crate::device::{Device, DeviceTensor, HostSlice};

/// The attention half of a decoder layer (HF names in comments). Linear weights are
/// `[out, in]`.
pub struct AttnWeights<T> {
    pub q_w: T, // self_attn.q_proj
    pub q_b: T,
    pub k_w: T, // self_attn.k_proj
    pub k_b: T,
    pub v_w: T, // self_attn.v_proj
    pub v_b: T,
    pub o_w: T, // self_attn.out_proj
    pub o_b: T,
    pub ln_w: T, // self_attn_layer_norm
    pub ln_b: T,
}

/// The MLP half of a decoder layer.
pub struct MlpWeights<T> {
    pub fc1_w: T,
    pub fc1_b: T,
    pub fc2_w: T,
    pub fc2_b: T,
    pub ln_w: T, // final_layer_norm (of the layer)
    pub ln_b: T,
}

/// One decoder layer's tensors: its two halves, which the offloader's `sep_layer` schedule
/// fetches separately.
pub struct LayerWeights<T> {
    pub attn: AttnWeights<T>,
    pub mlp: MlpWeights<T>,
}

pub use bench_core::model::layout::ATTN_TENSORS;

impl<T> AttnWeights<T> {
    /// From its tensors in [`layout::layer_tensors`] order (the first [`ATTN_TENSORS`]).
    pub fn from_tensors(t: &mut impl Iterator<Item = T>) -> Option<AttnWeights<T>> {
        Some(AttnWeights {
            q_w: t.next()?,
            q_b: t.next()?,
            k_w: t.next()?,
            k_b: t.next()?,
            v_w: t.next()?,
            v_b: t.next()?,
            o_w: t.next()?,
            o_b: t.next()?,
            ln_w: t.next()?,
            ln_b: t.next()?,
        })
    }
    fn all(&self) -> [&T; ATTN_TENSORS] {
        [
            &self.q_w, &self.q_b, &self.k_w, &self.k_b, &self.v_w, &self.v_b, &self.o_w, &self.o_b,
            &self.ln_w, &self.ln_b,
        ]
    }
}

impl<T> MlpWeights<T> {
    /// From its tensors in [`layout::layer_tensors`] order (the last six).
    pub fn from_tensors(t: &mut impl Iterator<Item = T>) -> Option<MlpWeights<T>> {
        Some(MlpWeights {
            fc1_w: t.next()?,
            fc1_b: t.next()?,
            fc2_w: t.next()?,
            fc2_b: t.next()?,
            ln_w: t.next()?,
            ln_b: t.next()?,
        })
    }
    fn all(&self) -> [&T; 6] {
        [
            &self.fc1_w,
            &self.fc1_b,
            &self.fc2_w,
            &self.fc2_b,
            &self.ln_w,
            &self.ln_b,
        ]
    }
}

impl<T> LayerWeights<T> {
    /// From its 16 tensors in [`layout::layer_tensors`] order.
    pub fn from_tensors(t: &mut impl Iterator<Item = T>) -> Option<LayerWeights<T>> {
        Some(LayerWeights {
            attn: AttnWeights::from_tensors(t)?,
            mlp: MlpWeights::from_tensors(t)?,
        })
    }
    /// Every tensor, in [`layout::layer_tensors`] order.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.attn.all().into_iter().chain(self.mlp.all())
    }
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
    let mut t = layout::layer_tensors(cfg, i)
        .into_iter()
        .map(|s| upload(dev, src, &s.name, &s.shape))
        .collect::<Result<Vec<_>>>()?
        .into_iter();
    Ok(LayerWeights::from_tensors(&mut t).expect("a layer has 16 tensors"))
}

/// Loads the non-layer tensors from `src` onto `dev`.
pub fn load_globals<D: Device>(
    dev: &D,
    src: &dyn TensorSource,
    cfg: &ModelConfig,
) -> Result<GlobalWeights<D::Tensor>> {
    let load = |spec: layout::TensorSpec| upload(dev, src, &spec.name, &spec.shape);
    let (project_in, project_out) = match layout::projections(cfg) {
        Some((p_in, p_out)) => (Some(load(p_in)?), Some(load(p_out)?)),
        None => (None, None),
    };
    let final_ln = match layout::final_layer_norm(cfg) {
        Some((w, b)) => Some((load(w)?, load(b)?)),
        None => None,
    };
    let lm_head = layout::lm_head(cfg);
    Ok(GlobalWeights {
        embed_tokens: load(layout::embed_tokens(cfg))?,
        embed_positions: load(layout::embed_positions(cfg))?,
        project_in,
        project_out,
        final_ln,
        lm_head: if src.contains(&lm_head.name) {
            Some(load(lm_head)?)
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
            n += l.all().map(|t| t.size_bytes()).sum::<usize>();
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
