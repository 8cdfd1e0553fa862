//! `config.json` of a HuggingFace OPT checkpoint -> [`ModelConfig`].

use std::path::Path;

use anyhow::{bail, Context, Result};
use bench_core::ModelConfig;
use serde::Deserialize;

#[derive(Deserialize)]
struct HfOptConfig {
    model_type: Option<String>,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    ffn_dim: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    word_embed_proj_dim: Option<usize>,
    #[serde(default = "yes")]
    do_layer_norm_before: bool,
    #[serde(default, rename = "_remove_final_layer_norm")]
    remove_final_layer_norm: bool,
    #[serde(default = "relu")]
    activation_function: String,
    #[serde(default = "yes")]
    enable_bias: bool,
    #[serde(default = "yes")]
    layer_norm_elementwise_affine: bool,
    pad_token_id: Option<u32>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    #[serde(rename = "_name_or_path")]
    name_or_path: Option<String>,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
}

fn yes() -> bool {
    true
}
fn relu() -> String {
    "relu".into()
}

/// Reads `<dir>/config.json`; the model's name is the directory's name.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: a checkpoint directory needs config.json",
            path.display()
        )
    })?;
    parse_config(&text, dir).with_context(|| format!("in {}", path.display()))
}

/// Whether `lm_head` is tied to the token embeddings (config `tie_word_embeddings`, default
/// true); an untied checkpoint must then contain `lm_head.weight`.
pub fn tied_lm_head(dir: &Path) -> Result<bool> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let c: HfOptConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(c.tie_word_embeddings)
}

pub fn parse_config(text: &str, dir: &Path) -> Result<ModelConfig> {
    let c: HfOptConfig = serde_json::from_str(text).context("not an OPT config.json")?;
    match c.model_type.as_deref() {
        Some("opt") => {}
        Some(other) => {
            bail!("model_type `{other}` is not supported: this engine runs OPT models only")
        }
        None => {
            bail!("config.json has no model_type: this engine runs OPT models (model_type \"opt\")")
        }
    }
    if c.activation_function != "relu" {
        bail!(
            "activation_function `{}` is not supported (OPT uses relu)",
            c.activation_function
        );
    }
    if !c.enable_bias || !c.layer_norm_elementwise_affine {
        bail!("OPT variants without biases or layer-norm affine parameters are not supported");
    }
    if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        bail!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            c.hidden_size,
            c.num_attention_heads
        );
    }
    if c.remove_final_layer_norm && c.do_layer_norm_before {
        bail!("_remove_final_layer_norm with a pre-LN model is not supported");
    }
    for (key, v) in [
        ("hidden_size", c.hidden_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("ffn_dim", c.ffn_dim),
        ("vocab_size", c.vocab_size),
        ("max_position_embeddings", c.max_position_embeddings),
    ] {
        if v == 0 {
            bail!("{key} is 0: a model needs at least one");
        }
    }
    for (key, id) in [
        ("pad_token_id", c.pad_token_id.unwrap_or(1)),
        ("bos_token_id", c.bos_token_id.unwrap_or(2)),
        ("eos_token_id", c.eos_token_id.unwrap_or(2)),
    ] {
        if id as usize >= c.vocab_size {
            bail!(
                "{key} {id} is outside the vocabulary (vocab_size {v}): set it in config.json to an \
                 id below {v} (OPT's defaults are pad 1, bos and eos 2)",
                v = c.vocab_size
            );
        }
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .or(c.name_or_path.clone())
        .unwrap_or_else(|| "opt".into());
    Ok(ModelConfig {
        name,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        hidden_size: c.hidden_size,
        ffn_dim: c.ffn_dim,
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        word_embed_proj_dim: c.word_embed_proj_dim.unwrap_or(c.hidden_size),
        do_layer_norm_before: c.do_layer_norm_before,
        pad_token_id: c.pad_token_id.unwrap_or(1),
        bos_token_id: c.bos_token_id.unwrap_or(2),
        eos_token_id: c.eos_token_id.unwrap_or(2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_other_architectures() {
        let e = parse_config(r#"{"model_type":"llama","hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,"ffn_dim":16,"vocab_size":10,"max_position_embeddings":8}"#, Path::new("x")).unwrap_err();
        assert!(format!("{e:#}").contains("llama"), "{e:#}");
        let e = parse_config(r#"{"model_type":"opt","hidden_size":9,"num_hidden_layers":1,"num_attention_heads":2,"ffn_dim":16,"vocab_size":10,"max_position_embeddings":8}"#, Path::new("x")).unwrap_err();
        assert!(format!("{e:#}").contains("multiple"), "{e:#}");
    }

    #[test]
    fn opt_350m_style() {
        let c = parse_config(r#"{"model_type":"opt","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"ffn_dim":128,"vocab_size":100,"max_position_embeddings":32,"word_embed_proj_dim":48,"do_layer_norm_before":false}"#, Path::new("/a/tiny")).unwrap();
        assert_eq!(c.word_embed_proj_dim, 48);
        assert!(!c.do_layer_norm_before);
        assert_eq!(c.name, "tiny");
        assert_eq!((c.pad_token_id, c.eos_token_id), (1, 2));
    }
}
