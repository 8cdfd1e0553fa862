//! Writes a dummy checkpoint as a HuggingFace model directory (`config.json` + `model.safetensors`,
//! or for models over [`SHARD_BYTES`] shards `model-00001-of-000NN.safetensors` with
//! `model.safetensors.index.json`, as HuggingFace saves large models) so that every framework
//! runs on the very same weights.
//!
//! The checkpoint is streamed tensor by tensor, chunk by chunk, so writing opt-175b never holds more
//! than one chunk in memory. It is written into a temporary sibling directory and renamed into place
//! only when complete, so a run killed halfway never leaves a checkpoint that looks usable.
//!
//! The safetensors layout is simple enough to write by hand (which is what lets us stream): an
//! 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}` padded
//! with spaces to a multiple of 8 bytes, then the tensors' bytes back to back.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use half::f16;
use rayon::prelude::*;

use crate::dummy::fill_chunk;
use crate::model::layout::{checkpoint_tensors, TensorSpec};
use crate::model::ModelConfig;

/// File names inside a checkpoint directory (HuggingFace's).
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest shard of a dummy checkpoint. safetensors readers map a whole file at once, so a
/// 26 GB single file cannot be opened on a machine with less free memory than that; real
/// HuggingFace checkpoints of large models are sharded too.
pub const SHARD_BYTES: u64 = 2_000_000_000;

/// Values generated per chunk: 4 Mi f16 = 8 MiB, large enough for rayon to split usefully.
const CHUNK: usize = 4 << 20;

/// Where the dummy checkpoint of `model` with `seed` lives under a cache directory.
pub fn dummy_checkpoint_dir(cache_dir: &Path, model: &str, seed: u64) -> PathBuf {
    cache_dir.join("dummy").join(format!("{model}-{seed:x}"))
}

/// Makes sure the dummy checkpoint of `cfg` with `seed` exists under `cache_dir` and returns its
/// directory. Reuses a complete one; writes it otherwise.
pub fn ensure_dummy_checkpoint(cache_dir: &Path, cfg: &ModelConfig, seed: u64) -> Result<PathBuf> {
    ensure_dummy_checkpoint_in_shards(cache_dir, cfg, seed, SHARD_BYTES)
}

/// [`ensure_dummy_checkpoint`] with shards of at most `shard_bytes` (tests shard small models).
pub fn ensure_dummy_checkpoint_in_shards(
    cache_dir: &Path,
    cfg: &ModelConfig,
    seed: u64,
    shard_bytes: u64,
) -> Result<PathBuf> {
    let dir = dummy_checkpoint_dir(cache_dir, &cfg.name, seed);
    let specs = checkpoint_tensors(cfg);
    if is_complete(&dir, &specs, shard_bytes) {
        return Ok(dir);
    }
    if dir.exists() {
        // Only a rename publishes a directory, so an incomplete one was damaged by hand: rebuild it.
        fs::remove_dir_all(&dir)
            .with_context(|| format!("removing incomplete dummy checkpoint {}", dir.display()))?;
    }
    let parent = dir.parent().expect("checkpoint dir has a parent");
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let need = checkpoint_bytes(cfg);
    if let Some(free) = crate::env::free_bytes(parent) {
        if free < need {
            bail!(
                "the dummy checkpoint of {} needs {:.1} GB in {}, which has {:.1} GB free; free space \
                 there or move the cache with FLEXBENCH_CACHE",
                cfg.name,
                need as f64 / 1e9,
                parent.display(),
                free as f64 / 1e9
            );
        }
    }
    let tmp = parent.join(format!(
        ".{}.tmp-{}-{}",
        dir.file_name().unwrap().to_string_lossy(),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let written = write_checkpoint(&tmp, cfg, &specs, seed, shard_bytes);
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing dummy checkpoint into {}", tmp.display())));
    }
    if let Err(e) = fs::rename(&tmp, &dir) {
        let _ = fs::remove_dir_all(&tmp);
        // Another process may have published the same checkpoint meanwhile; theirs is as good.
        if is_complete(&dir, &specs, shard_bytes) {
            return Ok(dir);
        }
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()));
    }
    Ok(dir)
}

/// The files of a dummy checkpoint: one `model.safetensors` up to [`SHARD_BYTES`], else shards of
/// at most that size (a tensor larger than that gets a shard of its own) named as HuggingFace
/// names them, with their index. Each entry: file name and the indexes of its tensors.
pub fn shard_layout(specs: &[TensorSpec], shard_bytes: u64) -> Vec<(String, Vec<usize>)> {
    let total: u64 = specs.iter().map(|s| s.numel() as u64 * 2).sum();
    if total <= shard_bytes {
        return vec![(WEIGHTS_FILE.to_string(), (0..specs.len()).collect())];
    }
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let bytes = s.numel() as u64 * 2;
        if size > 0 && size + bytes > shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard at least").push(i);
        size += bytes;
    }
    let n = shards.len();
    shards
        .into_iter()
        .enumerate()
        .map(|(i, t)| (format!("model-{:05}-of-{n:05}.safetensors", i + 1), t))
        .collect()
}

/// Bytes the checkpoint of `cfg` takes on disk, every file included.
pub fn checkpoint_bytes(cfg: &ModelConfig) -> u64 {
    let specs = checkpoint_tensors(cfg);
    shard_layout(&specs, SHARD_BYTES)
        .iter()
        .map(|(_, idx)| file_len(&pick(&specs, idx)))
        .sum::<u64>()
        + 64 * 1024
}

fn pick(specs: &[TensorSpec], idx: &[usize]) -> Vec<TensorSpec> {
    idx.iter().map(|&i| specs[i].clone()).collect()
}

/// Whether `dir` holds a complete dummy checkpoint of `cfg` as [`ensure_dummy_checkpoint`]
/// writes it (or its older single-file form).
pub fn is_complete_checkpoint(dir: &Path, cfg: &ModelConfig) -> bool {
    is_complete(dir, &checkpoint_tensors(cfg), SHARD_BYTES)
}

/// A checkpoint directory is complete when config.json and every weight file exist with the
/// exact size their headers promise (the rename already guarantees they were fully written;
/// this guards against hand edits and a changed tensor layout). A complete single
/// `model.safetensors` written before checkpoints were sharded is complete too.
fn is_complete(dir: &Path, specs: &[TensorSpec], shard_bytes: u64) -> bool {
    if !dir.join(CONFIG_FILE).is_file() {
        return false;
    }
    let len_is =
        |file: &str, want: u64| fs::metadata(dir.join(file)).is_ok_and(|m| m.len() == want);
    if len_is(WEIGHTS_FILE, file_len(specs)) {
        return true;
    }
    let layout = shard_layout(specs, shard_bytes);
    layout.len() > 1
        && dir.join(INDEX_FILE).is_file()
        && layout
            .iter()
            .all(|(f, idx)| len_is(f, file_len(&pick(specs, idx))))
}

fn file_len(specs: &[TensorSpec]) -> u64 {
    let header = header_bytes(specs);
    let data: usize = specs.iter().map(|s| s.numel() * 2).sum();
    8 + header.len() as u64 + data as u64
}

/// The safetensors JSON header for f16 tensors laid out in `specs` order, padded to 8 bytes.
fn header_bytes(specs: &[TensorSpec]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert(
        "__metadata__".into(),
        serde_json::json!({ "format": "pt", "generator": "flexbench dummy weights" }),
    );
    let mut offset = 0usize;
    for s in specs {
        let end = offset + s.numel() * 2;
        map.insert(
            s.name.clone(),
            serde_json::json!({ "dtype": "F16", "shape": s.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&map).expect("a header always serializes");
    // The data must start 8-byte aligned so readers can memory-map tensors in place.
    let pad = (8 - bytes.len() % 8) % 8;
    bytes.extend(std::iter::repeat_n(b' ', pad));
    bytes
}

fn write_checkpoint(
    dir: &Path,
    cfg: &ModelConfig,
    specs: &[TensorSpec],
    seed: u64,
    shard_bytes: u64,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = serde_json::to_vec_pretty(&hf_config(cfg, seed))?;
    fs::write(dir.join(CONFIG_FILE), config)
        .with_context(|| format!("writing {}", dir.join(CONFIG_FILE).display()))?;
    let layout = shard_layout(specs, shard_bytes);
    let mut values = vec![f16::ZERO; CHUNK];
    let mut bytes = vec![0u8; CHUNK * 2];
    for (file, idx) in &layout {
        let shard = pick(specs, idx);
        write_shard(&dir.join(file), &shard, seed, &mut values, &mut bytes)?;
    }
    if layout.len() > 1 {
        let mut weight_map = serde_json::Map::new();
        for (file, idx) in &layout {
            for &i in idx {
                weight_map.insert(specs[i].name.clone(), file.clone().into());
            }
        }
        let total: u64 = specs.iter().map(|s| s.numel() as u64 * 2).sum();
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        // Written last: a directory with an index has every shard.
        fs::write(dir.join(INDEX_FILE), serde_json::to_vec_pretty(&index)?)
            .with_context(|| format!("writing {}", dir.join(INDEX_FILE).display()))?;
    }
    Ok(())
}

/// One safetensors file of `specs`, streamed in chunks and synced.
fn write_shard(
    path: &Path,
    specs: &[TensorSpec],
    seed: u64,
    values: &mut [f16],
    bytes: &mut [u8],
) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let header = header_bytes(specs);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for spec in specs {
        let n = spec.numel();
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            // Parallel fill: each value depends only on its index, so sub-chunks are independent.
            values[..len]
                .par_chunks_mut(1 << 16)
                .enumerate()
                .for_each(|(i, sub)| fill_chunk(spec, seed, start + i * (1 << 16), sub));
            for (v, b) in values[..len].iter().zip(bytes.chunks_exact_mut(2)) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            out.write_all(&bytes[..len * 2])
                .with_context(|| format!("writing {}", path.display()))?;
            start += len;
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    let len = fs::metadata(path)?.len();
    if len != file_len(specs) {
        bail!(
            "{} has {len} bytes, expected {}",
            path.display(),
            file_len(specs)
        );
    }
    Ok(())
}

/// HuggingFace's `OPTConfig` for the model, as `config.json` holds it.
pub fn hf_config(cfg: &ModelConfig, seed: u64) -> serde_json::Value {
    let mut c = BTreeMap::new();
    let mut put = |k: &str, v: serde_json::Value| {
        c.insert(k.to_string(), v);
    };
    put("architectures", serde_json::json!(["OPTForCausalLM"]));
    put("model_type", "opt".into());
    put(
        "_name_or_path",
        format!("flexbench-dummy/{}", cfg.name).into(),
    );
    put("hidden_size", cfg.hidden_size.into());
    put("num_hidden_layers", cfg.num_hidden_layers.into());
    put("num_attention_heads", cfg.num_attention_heads.into());
    put("ffn_dim", cfg.ffn_dim.into());
    put("vocab_size", cfg.vocab_size.into());
    put(
        "max_position_embeddings",
        cfg.max_position_embeddings.into(),
    );
    put("word_embed_proj_dim", cfg.word_embed_proj_dim.into());
    put("do_layer_norm_before", cfg.do_layer_norm_before.into());
    put("pad_token_id", cfg.pad_token_id.into());
    put("bos_token_id", cfg.bos_token_id.into());
    put("eos_token_id", cfg.eos_token_id.into());
    put("activation_function", "relu".into());
    put("dropout", 0.0.into());
    put("attention_dropout", 0.0.into());
    put("activation_dropout", 0.0.into());
    put("layerdrop", 0.0.into());
    put("init_std", 0.02.into());
    put("enable_bias", true.into());
    put("layer_norm_elementwise_affine", true.into());
    put("_remove_final_layer_norm", false.into());
    put("tie_word_embeddings", true.into());
    put("use_cache", true.into());
    // `dtype` is transformers 5's key, `torch_dtype` the older one.
    put("dtype", "float16".into());
    put("torch_dtype", "float16".into());
    put("flexbench_dummy_seed", seed.into());
    serde_json::to_value(c).expect("a config always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dummy::{tensor, DEFAULT_SEED};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flexbench-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    /// Parses the file back with our own reader of the format; the cross-check against the
    /// `safetensors` crate is tests/checkpoint.rs.
    #[test]
    fn writes_exact_values_and_reuses_complete_checkpoints() {
        let cache = scratch("exact");
        let cfg = crate::model::lookup("opt-tiny-odd").unwrap();
        let dir = ensure_dummy_checkpoint(&cache, &cfg, DEFAULT_SEED).unwrap();
        assert_eq!(
            dir,
            dummy_checkpoint_dir(&cache, "opt-tiny-odd", DEFAULT_SEED)
        );
        let bytes = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let specs = checkpoint_tensors(&cfg);
        for spec in &specs {
            let entry = &header[&spec.name];
            assert_eq!(entry["dtype"], "F16");
            let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone()).unwrap();
            assert_eq!(shape, spec.shape);
            let off: Vec<usize> = serde_json::from_value(entry["data_offsets"].clone()).unwrap();
            let got: Vec<f16> = data[off[0]..off[1]]
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]))
                .collect();
            assert_eq!(got, tensor(spec, DEFAULT_SEED), "{}", spec.name);
        }
        let config: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(config["ffn_dim"], 200);
        assert_eq!(config["vocab_size"], 997);

        // A second call reuses the file (same modification time, no temp dirs left behind).
        let before = fs::metadata(dir.join(WEIGHTS_FILE))
            .unwrap()
            .modified()
            .unwrap();
        ensure_dummy_checkpoint(&cache, &cfg, DEFAULT_SEED).unwrap();
        let after = fs::metadata(dir.join(WEIGHTS_FILE))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);
        let leftovers: Vec<_> = fs::read_dir(cache.join("dummy"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(leftovers, vec![format!("opt-tiny-odd-{DEFAULT_SEED:x}")]);
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn damaged_checkpoint_is_rewritten() {
        let cache = scratch("damaged");
        let cfg = crate::model::lookup("opt-tiny").unwrap();
        let dir = ensure_dummy_checkpoint(&cache, &cfg, 7).unwrap();
        let full = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        fs::write(dir.join(WEIGHTS_FILE), &full[..full.len() / 2]).unwrap();
        ensure_dummy_checkpoint(&cache, &cfg, 7).unwrap();
        assert_eq!(fs::read(dir.join(WEIGHTS_FILE)).unwrap(), full);
        fs::remove_dir_all(&cache).unwrap();
    }
}
