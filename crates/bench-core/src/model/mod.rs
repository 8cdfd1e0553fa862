//! The OPT model registry and FlexLLMGen's size formulas; [`layout`] names every tensor.

pub mod layout;

use serde::{Deserialize, Serialize};

/// Shape of one OPT model, the fields of HuggingFace's `OPTConfig` that the math needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub name: String,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub hidden_size: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// Width of the token embedding; differs from `hidden_size` only for opt-350m,
    /// which then has `project_in` / `project_out`.
    pub word_embed_proj_dim: usize,
    /// Pre-LN (true for every OPT but opt-350m). Post-LN models have no final layer norm.
    pub do_layer_norm_before: bool,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

impl ModelConfig {
    fn opt(name: &str, layers: usize, heads: usize, hidden: usize) -> ModelConfig {
        ModelConfig {
            name: name.to_string(),
            num_hidden_layers: layers,
            num_attention_heads: heads,
            hidden_size: hidden,
            ffn_dim: 4 * hidden,
            vocab_size: 50272,
            max_position_embeddings: 2048,
            word_embed_proj_dim: hidden,
            do_layer_norm_before: true,
            pad_token_id: 1,
            bos_token_id: 2,
            eos_token_id: 2,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Bytes of all weights in fp16 (FlexLLMGen's formula, which ignores project_in/out).
    pub fn model_bytes(&self) -> u64 {
        let h = self.hidden_size as u64;
        let l = self.num_hidden_layers as u64;
        let v = self.vocab_size as u64;
        let per_layer = h * (3 * h + 1) + h * (h + 1) + h * (4 * h + 1) + 4 * h * (h + 1) + 4 * h;
        2 * (l * per_layer + v * (h + 1))
    }

    /// Bytes of the fp16 KV cache for `batch` sequences of `seq_len` tokens.
    pub fn cache_bytes(&self, batch: usize, seq_len: usize) -> u64 {
        2 * batch as u64
            * seq_len as u64
            * self.num_hidden_layers as u64
            * self.hidden_size as u64
            * 2
    }

    /// Bytes of one fp16 hidden-state tensor for `batch` sequences of `seq_len` tokens.
    pub fn hidden_bytes(&self, batch: usize, seq_len: usize) -> u64 {
        batch as u64 * seq_len as u64 * self.hidden_size as u64 * 2
    }
}

/// Every OPT size, plus small shapes for tests (`opt-tiny*`), in registry order.
pub fn registry() -> Vec<ModelConfig> {
    let mut out = vec![
        ModelConfig::opt("opt-125m", 12, 12, 768),
        ModelConfig {
            word_embed_proj_dim: 512,
            do_layer_norm_before: false,
            ..ModelConfig::opt("opt-350m", 24, 16, 1024)
        },
        ModelConfig::opt("opt-1.3b", 24, 32, 2048),
        ModelConfig::opt("opt-2.7b", 32, 32, 2560),
        ModelConfig::opt("opt-6.7b", 32, 32, 4096),
        ModelConfig::opt("opt-13b", 40, 40, 5120),
        ModelConfig::opt("opt-30b", 48, 56, 7168),
        ModelConfig::opt("opt-66b", 64, 72, 9216),
        ModelConfig::opt("opt-175b", 96, 96, 12288),
    ];
    // Test shapes: small enough for unit tests, odd enough to catch indexing bugs.
    out.push(ModelConfig {
        vocab_size: 1000,
        max_position_embeddings: 512,
        ..ModelConfig::opt("opt-tiny", 2, 4, 64)
    });
    out.push(ModelConfig {
        vocab_size: 997,
        max_position_embeddings: 256,
        ffn_dim: 200,
        ..ModelConfig::opt("opt-tiny-odd", 3, 5, 80)
    });
    out.push(ModelConfig {
        vocab_size: 1000,
        max_position_embeddings: 512,
        word_embed_proj_dim: 48,
        do_layer_norm_before: false,
        ..ModelConfig::opt("opt-tiny-postln", 2, 4, 64)
    });
    out
}

/// Looks a model up by name; `facebook/opt-1.3b` and `opt-1.3b` are the same model.
pub fn lookup(name: &str) -> Option<ModelConfig> {
    let short = name.rsplit('/').next().unwrap_or(name);
    registry().into_iter().find(|m| m.name == short)
}

/// Names of every registered model, for error messages.
pub fn names() -> Vec<String> {
    registry().into_iter().map(|m| m.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_flexllmgen() {
        // FlexLLMGen logs opt-6.7b as 12.4 GB of fp16 weights.
        let m = lookup("facebook/opt-6.7b").unwrap();
        let gb = m.model_bytes() as f64 / (1u64 << 30) as f64;
        assert!((gb - 12.4).abs() < 0.1, "{gb}");
        // opt-175b: 324 GB in the paper's table.
        let m = lookup("opt-175b").unwrap();
        let gb = m.model_bytes() as f64 / 1e9;
        assert!(
            (gb - 348.0).abs() < 2.0 || (gb / 1.0737 - 324.0).abs() < 2.0,
            "{gb}"
        );
        // hand computed: h=64, L=2, V=1000
        let t = lookup("opt-tiny").unwrap();
        let h = 64u64;
        let layer = h * 193 + h * 65 + h * 257 + 4 * h * 65 + 4 * h;
        assert_eq!(t.model_bytes(), 2 * (2 * layer + 1000 * 65));
        assert_eq!(t.cache_bytes(3, 10), 2 * 3 * 10 * 2 * 64 * 2);
        assert_eq!(t.hidden_bytes(3, 10), 3 * 10 * 64 * 2);
    }

    #[test]
    fn every_size_is_registered() {
        for n in [
            "125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b", "175b",
        ] {
            let m = lookup(&format!("opt-{n}")).unwrap();
            assert_eq!(m.hidden_size % m.num_attention_heads, 0);
        }
        assert!(lookup("opt-7b").is_none());
    }
}
