//! Loading the kernels of `kernels/` into a CUDA context: compiled at run time by the machine's
//! own NVRTC (PTX or CUBIN from a newer NVRTC than the driver cannot be loaded), to CUBIN for the
//! exact GPU architecture, and cached on disk per architecture so later processes skip NVRTC.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::kernels::{compile_options, COMMON_HEADER, SOURCES};
use super::nvrtc::{wheel_toolkit, Nvrtc};

/// Every kernel function of every module, by name.
pub struct KernelSet {
    funcs: HashMap<String, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
    /// e.g. `sm_90`
    pub arch: String,
    /// Where the CUBINs were read from or written to.
    pub cache_dir: PathBuf,
    /// Whether NVRTC ran in this process (false: all taken from the cache).
    pub compiled: bool,
}

impl KernelSet {
    /// Compiles (or reads from `cache_root`) and loads every kernel for `ctx`'s GPU.
    pub fn load(ctx: &Arc<CudaContext>, cache_root: &Path) -> Result<KernelSet> {
        let (major, minor) = ctx
            .compute_capability()
            .context("reading the GPU's compute capability")?;
        let arch = format!("sm_{major}{minor}");
        let include = find_cuda_include();
        let options = compile_options(&arch, include.as_deref());
        // The key covers the sources and options. NVRTC's version is left out so that a cache hit
        // never loads NVRTC: CUBIN for the exact architecture stays loadable by later drivers.
        let mut key = Fnv::new();
        key.add(COMMON_HEADER.1.as_bytes());
        for (name, src) in SOURCES {
            key.add(name.as_bytes());
            key.add(src.as_bytes());
        }
        for o in &options {
            key.add(o.as_bytes());
        }
        let cache_dir = cache_root
            .join("cuda-kernels")
            .join(&arch)
            .join(format!("{:016x}", key.finish()));

        let mut nvrtc: Option<Nvrtc> = None;
        let mut compiled = false;
        let mut funcs = HashMap::new();
        let mut modules = Vec::new();
        for (name, src) in SOURCES {
            let cubin_path = cache_dir.join(format!("{name}.cubin"));
            let cubin = match std::fs::read(&cubin_path) {
                Ok(b) if !b.is_empty() => b,
                _ => {
                    if nvrtc.is_none() {
                        nvrtc = Some(find_nvrtc()?);
                    }
                    let nv = nvrtc.as_ref().unwrap();
                    let out = nv
                        .compile(name, src, &[COMMON_HEADER], &options)
                        .with_context(|| {
                            format!(
                                "compiling kernels/{name} for {arch} with NVRTC from {}",
                                nv.origin
                            )
                        })?;
                    compiled = true;
                    let Some(cubin) = out.cubin else {
                        bail!("NVRTC produced no CUBIN for kernels/{name} ({arch})");
                    };
                    write_atomically(&cubin_path, &cubin)?;
                    cubin
                }
            };
            let module = ctx.load_module(Ptx::from_binary(cubin)).with_context(|| {
                format!("loading kernels/{name} ({arch}) into the CUDA context")
            })?;
            for f in entry_points(src) {
                let func = module
                    .load_function(&f)
                    .with_context(|| format!("kernel {f} of kernels/{name}"))?;
                funcs.insert(f, func);
            }
            modules.push(module);
        }
        Ok(KernelSet {
            funcs,
            _modules: modules,
            arch,
            cache_dir,
            compiled,
        })
    }

    /// The kernel called `name`.
    pub fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .with_context(|| format!("no kernel named {name} in kernels/*.cu"))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.funcs.keys().map(String::as_str)
    }
}

/// Names of the `extern "C" __global__` functions of a source file (with or without
/// `__launch_bounds__`).
pub fn entry_points(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\" __global__ void") {
        rest = &rest[i + "extern \"C\" __global__ void".len()..];
        let mut s = rest.trim_start();
        if let Some(after) = s.strip_prefix("__launch_bounds__") {
            let close = after.find(')').map(|c| c + 1).unwrap_or(0);
            s = after[close..].trim_start();
        }
        let name: String = s
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// NVRTC for run-time compilation: `$FLEXBENCH_NVRTC` (a file), then the loader's search path,
/// then the usual toolkit directories.
pub fn find_nvrtc() -> Result<Nvrtc> {
    if let Some(p) = std::env::var_os("FLEXBENCH_NVRTC") {
        return Nvrtc::load(Some(Path::new(&p)));
    }
    match Nvrtc::load(None) {
        Ok(n) => Ok(n),
        Err(e) => {
            for dir in toolkit_dirs() {
                let p = dir.join("lib64").join("libnvrtc.so.13");
                if p.is_file() {
                    return Nvrtc::load(Some(&p));
                }
            }
            Err(e)
        }
    }
}

fn toolkit_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .collect();
    dirs.push(PathBuf::from("/usr/local/cuda"));
    if let Ok(rd) = std::fs::read_dir("/usr/local") {
        let mut versioned: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("cuda-13"))
            })
            .collect();
        versioned.sort();
        dirs.extend(versioned.into_iter().rev());
    }
    dirs
}

/// A directory holding `cuda_fp16.h` (NVRTC does not bundle it): `$FLEXBENCH_CUDA_INCLUDE`, a
/// toolkit's include directory, or the PyPI wheel cache that `cargo xtask check-kernels` fills.
pub fn find_cuda_include() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLEXBENCH_CUDA_INCLUDE") {
        return Some(PathBuf::from(p));
    }
    for dir in toolkit_dirs() {
        let inc = dir.join("include");
        if inc.join("cuda_fp16.h").is_file() {
            return Some(inc);
        }
    }
    wheel_toolkit(&bench_core::dirs::cache_dir().join("nvrtc")).map(|t| t.include)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("cache path without a parent")?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the kernel cache {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// 64-bit FNV-1a: a stable content hash for cache keys (std's hasher is not stable across
/// releases).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_finds_every_kernel_of_every_file() {
        let all: Vec<String> = SOURCES.iter().flat_map(|(_, s)| entry_points(s)).collect();
        for k in [
            "attention_prefill_f16",
            "attention_decode_f16",
            "attention_decode_reduce_f16",
            "layernorm_f16",
            "gather_rows_f16",
            "argmax_f16",
            "sample_temperature_f16",
        ] {
            assert!(all.iter().any(|n| n == k), "{k} not found in {all:?}");
        }
        for (name, src) in SOURCES {
            assert!(
                !entry_points(src).is_empty(),
                "{name} has no extern \"C\" kernel"
            );
        }
    }

    /// Compiles every kernel with NVRTC when a CUDA 13 NVRTC and headers are found (the machine's
    /// toolkit, or the wheel cache of `cargo xtask check-kernels`); says so and passes when
    /// neither is there, since a GPU-less machine need not have either.
    #[test]
    fn kernels_compile_with_nvrtc_when_available() {
        let wheel = wheel_toolkit(&bench_core::dirs::cache_dir().join("nvrtc"));
        let nv = match find_nvrtc() {
            Ok(n) => n,
            Err(_) => match &wheel {
                Some(t) => Nvrtc::load(Some(&t.lib)).expect("wheel NVRTC loads"),
                None => {
                    eprintln!("skipped: no libnvrtc.so.13 here (run `cargo xtask check-kernels` to fetch one)");
                    return;
                }
            },
        };
        let Some(include) = find_cuda_include() else {
            eprintln!("skipped: no cuda_fp16.h here (run `cargo xtask check-kernels` to fetch it)");
            return;
        };
        let opts = compile_options("sm_80", Some(&include));
        for (name, src) in SOURCES {
            let out = nv
                .compile(name, src, &[COMMON_HEADER], &opts)
                .unwrap_or_else(|e| panic!("{e:#}"));
            assert!(
                out.cubin.as_ref().is_some_and(|c| !c.is_empty()),
                "{name}: no CUBIN"
            );
            for f in entry_points(src) {
                assert!(out.ptx.contains(&f), "{name}: PTX lacks {f}");
            }
        }
    }
}
