//! Where weights come from: HuggingFace safetensors checkpoints (memory-mapped, single file or
//! sharded) or deterministic dummy values. Both hand out fp16 tensors by canonical name
//! (`model.decoder.…`, `lm_head.weight`), checked against the expected shape.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use bench_core::ModelConfig;
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;

use crate::device::alloc::try_zeros;
use bench_core::dummy;

/// A source of fp16 weight tensors.
pub trait TensorSource: Send + Sync {
    /// Where the tensors come from, for messages.
    fn describe(&self) -> String;
    /// Whether the tensor (canonical name) exists.
    fn contains(&self, name: &str) -> bool;
    /// The tensor converted to fp16; an error names the tensor (and file) when it is missing, has
    /// another shape or an unsupported dtype.
    fn load_f16(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>>;
    /// The tensor in consecutive chunks of at most `chunk` values, handed to `f` in order. The
    /// offloader streams tensors to disk through it; sources that can produce a chunk without the
    /// whole tensor (dummy weights) override it so no tensor is ever whole in memory.
    fn for_each_chunk(
        &self,
        name: &str,
        shape: &[usize],
        chunk: usize,
        f: &mut dyn FnMut(&[f16]) -> Result<()>,
    ) -> Result<()> {
        let all = self.load_f16(name, shape)?;
        for c in all.chunks(chunk.max(1)) {
            f(c)?;
        }
        Ok(())
    }
}

/// Name without the `model.` prefix that OPTForCausalLM adds; the key of the tensor index.
fn normalize(name: &str) -> &str {
    name.strip_prefix("model.").unwrap_or(name)
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Bytes before the data section (8 + header length).
    data_start: usize,
}

/// A HuggingFace checkpoint directory's safetensors files, memory-mapped.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// normalized name -> (shard, info)
    index: HashMap<String, (usize, TensorInfo)>,
}

impl Checkpoint {
    /// Opens `model.safetensors.index.json` (sharded), else `model.safetensors`, else every
    /// `*.safetensors` file in `dir`. Headers are parsed and validated now; data is mapped.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        ensure!(
            dir.is_dir(),
            "checkpoint directory {} does not exist",
            dir.display()
        );
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("reading {}", index_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{} has no weight_map object", index_path.display()))?;
            let names: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else if dir.join("model.safetensors").is_file() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("listing {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            v.sort();
            v
        };
        ensure!(
            !files.is_empty(),
            "no safetensors weights in {} (expected model.safetensors or model.safetensors.index.json; \
             .bin checkpoints are not supported: convert them with transformers' save_pretrained(safe_serialization=True))",
            dir.display()
        );
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while we run is the user's
            // problem, as with every mmap-based loader.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a valid safetensors file ({e:?}): truncated or corrupt?",
                    path.display()
                )
            })?;
            let si = shards.len();
            for (name, info) in meta.tensors() {
                index.insert(normalize(&name).to_string(), (si, info.clone()));
            }
            shards.push(Shard {
                path,
                mmap,
                data_start: 8 + n,
            });
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    /// Checks the checkpoint against `cfg` (its config.json) before anything is built from
    /// either: every tensor it holds belongs to the model, and every tensor of the model is there
    /// with its shape and a supported dtype (lm_head may be absent). Nothing is allocated per
    /// layer, so a config claiming a billion layers fails on its first missing one.
    pub fn check_against(&self, cfg: &ModelConfig) -> Result<()> {
        use bench_core::model::layout;
        let config = self.dir.join("config.json");
        let layers_here = self
            .index
            .keys()
            .filter_map(|n| {
                n.strip_prefix("decoder.layers.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |i| i + 1);
        let layer_parts: Vec<String> = layout::layer_tensors(cfg, 0)
            .into_iter()
            .map(|s| s.name["model.decoder.layers.0.".len()..].to_string())
            .collect();
        let mut globals: Vec<String> = layout::input_tensors(cfg)
            .into_iter()
            .chain(layout::output_tensors(cfg, true))
            .map(|s| normalize(&s.name).to_string())
            .collect();
        globals.sort();
        let mut names: Vec<&String> = self.index.keys().collect();
        names.sort();
        for name in names {
            let belongs = match name.strip_prefix("decoder.layers.") {
                Some(rest) => rest.split_once('.').is_some_and(|(i, part)| {
                    i.parse::<usize>().is_ok_and(|i| i < cfg.num_hidden_layers)
                        && layer_parts.iter().any(|p| p == part)
                }),
                None => globals.binary_search(name).is_ok(),
            };
            ensure!(
                belongs,
                "tensor {name} in the checkpoint in {} is not part of the model {} describes \
                 ({} layers, hidden {}, word_embed_proj_dim {}); the checkpoint has {layers_here} layers: \
                 fix config.json or use the checkpoint it belongs to",
                self.dir.display(),
                config.display(),
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.word_embed_proj_dim
            );
        }
        let check = |spec: &layout::TensorSpec| -> Result<()> {
            let (si, info) = self.index.get(normalize(&spec.name)).with_context(|| {
                format!(
                    "tensor {} is missing from the checkpoint in {} ({} says {} layers, the \
                     checkpoint has {layers_here})",
                    spec.name,
                    self.dir.display(),
                    config.display(),
                    cfg.num_hidden_layers
                )
            })?;
            let file = self.shards[*si].path.display();
            ensure!(
                info.shape == spec.shape,
                "tensor {} in {file} has shape {:?}, but {} implies {:?}",
                spec.name,
                info.shape,
                config.display(),
                spec.shape
            );
            ensure!(
                matches!(info.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32),
                "tensor {} in {file} has dtype {:?}; supported: F32, F16, BF16",
                spec.name,
                info.dtype
            );
            Ok(())
        };
        for spec in layout::input_tensors(cfg)
            .iter()
            .chain(&layout::output_tensors(cfg, false))
        {
            check(spec)?;
        }
        for i in 0..cfg.num_hidden_layers {
            for spec in layout::layer_tensors(cfg, i) {
                check(&spec)?;
            }
        }
        Ok(())
    }
}

impl TensorSource for Checkpoint {
    fn describe(&self) -> String {
        format!("checkpoint {}", self.dir.display())
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(normalize(name))
    }

    fn load_f16(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
        let (si, info) = self.index.get(normalize(name)).with_context(|| {
            format!(
                "tensor {name} is missing from the checkpoint in {}",
                self.dir.display()
            )
        })?;
        let shard = &self.shards[*si];
        ensure!(
            info.shape == shape,
            "tensor {name} in {} has shape {:?}, expected {:?}",
            shard.path.display(),
            info.shape,
            shape
        );
        let (a, b) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + a..shard.data_start + b];
        let n: usize = shape.iter().product();
        let mut out = try_zeros::<f16>(n).with_context(|| format!("loading tensor {name}"))?;
        let width = match info.dtype {
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 => 4,
            other => bail!(
                "tensor {name} in {} has dtype {other:?}; supported: F32, F16, BF16",
                shard.path.display()
            ),
        };
        ensure!(
            bytes.len() == n * width,
            "tensor {name} in {}: {} bytes for {n} values",
            shard.path.display(),
            bytes.len()
        );
        match info.dtype {
            Dtype::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]);
                }
            }
            Dtype::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_f32(bf16::from_le_bytes([c[0], c[1]]).to_f32());
                }
            }
            _ => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                }
            }
        }
        Ok(out)
    }
}

/// Dummy weights ([`bench_core::dummy`]) of a registry model.
pub struct DummySource {
    specs: HashMap<String, bench_core::model::layout::TensorSpec>,
    seed: u64,
}

impl DummySource {
    pub fn new(cfg: &ModelConfig, seed: u64) -> DummySource {
        let specs = bench_core::model::layout::checkpoint_tensors(cfg)
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        DummySource { specs, seed }
    }
}

impl TensorSource for DummySource {
    fn describe(&self) -> String {
        format!("dummy weights (seed {:#x})", self.seed)
    }
    fn contains(&self, name: &str) -> bool {
        self.specs.contains_key(name)
    }
    fn load_f16(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
        let spec = self
            .specs
            .get(name)
            .with_context(|| format!("dummy weights have no tensor {name}"))?;
        ensure!(
            spec.shape == shape,
            "dummy tensor {name} has shape {:?}, expected {shape:?}",
            spec.shape
        );
        let mut out = try_zeros::<f16>(spec.numel())?;
        fill_parallel(spec, self.seed, 0, &mut out);
        Ok(out)
    }
    fn for_each_chunk(
        &self,
        name: &str,
        shape: &[usize],
        chunk: usize,
        f: &mut dyn FnMut(&[f16]) -> Result<()>,
    ) -> Result<()> {
        let spec = self
            .specs
            .get(name)
            .with_context(|| format!("dummy weights have no tensor {name}"))?;
        ensure!(
            spec.shape == shape,
            "dummy tensor {name} has shape {:?}, expected {shape:?}",
            spec.shape
        );
        let n = spec.numel();
        let chunk = chunk.max(1);
        let mut buf = try_zeros::<f16>(chunk.min(n))?;
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            fill_parallel(spec, self.seed, start, &mut buf[..len]);
            f(&buf[..len])?;
            start += len;
        }
        Ok(())
    }
}

/// `out` = the tensor's dummy values from `start`, generated on all cores.
fn fill_parallel(
    spec: &bench_core::model::layout::TensorSpec,
    seed: u64,
    start: usize,
    out: &mut [f16],
) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, c)| dummy::fill_chunk(spec, seed, start + i * CHUNK, c));
}
