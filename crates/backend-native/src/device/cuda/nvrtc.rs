//! A small NVRTC binding loaded with dlopen from a path we choose.
//!
//! cudarc's own `nvrtc` module finds the library by name only and panics when it is missing; the
//! kernel check (`cargo xtask check-kernels`) must use the libnvrtc it downloaded into a cache
//! directory, and the runtime must fail with an error, not a panic, on a machine without NVRTC.
//! The handful of entry points needed (create, compile, log, PTX, CUBIN) are bound here.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use libloading::{Library, Symbol};

type Prog = *mut std::ffi::c_void;
type NvrtcResult = c_int;

/// Library names tried when no explicit path is given: CUDA 13 first (what the pinned cudarc
/// feature targets), then an unversioned development link.
const NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so"];

/// A loaded libnvrtc.
pub struct Nvrtc {
    lib: Library,
    /// Where it was loaded from (a path, or the name the dynamic loader resolved).
    pub origin: String,
}

/// What one compilation produced.
pub struct Compiled {
    /// NVRTC's log: warnings, and with `-Xptxas -v` style options the per-kernel resource usage.
    pub log: String,
    pub ptx: String,
    /// Machine code, present when compiled for a real architecture (`sm_XX`).
    pub cubin: Option<Vec<u8>>,
}

impl Nvrtc {
    /// Loads libnvrtc from `path`, or by name from the dynamic loader's search path.
    pub fn load(path: Option<&Path>) -> Result<Nvrtc> {
        if let Some(p) = path {
            // SAFETY: loading a shared library runs its initialisers; libnvrtc's are benign.
            let lib = unsafe { Library::new(p) }
                .with_context(|| format!("loading NVRTC from {}", p.display()))?;
            return Ok(Nvrtc {
                lib,
                origin: p.display().to_string(),
            });
        }
        let mut errors = Vec::new();
        for name in NAMES {
            // SAFETY: as above.
            match unsafe { Library::new(*name) } {
                Ok(lib) => {
                    return Ok(Nvrtc {
                        lib,
                        origin: (*name).to_string(),
                    })
                }
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        bail!(
            "NVRTC (libnvrtc.so.13) not found on the library search path ({}); install the CUDA 13 \
             toolkit or set LD_LIBRARY_PATH to the directory holding libnvrtc.so.13",
            errors.join("; ")
        )
    }

    fn sym<T>(&self, name: &[u8]) -> Result<Symbol<'_, T>> {
        // SAFETY: the caller names the symbol with its documented C signature.
        unsafe { self.lib.get::<T>(name) }.with_context(|| {
            format!(
                "NVRTC at {} lacks {}",
                self.origin,
                String::from_utf8_lossy(name)
            )
        })
    }

    fn error_string(&self, code: NvrtcResult) -> String {
        let f = self
            .sym::<unsafe extern "C" fn(NvrtcResult) -> *const c_char>(b"nvrtcGetErrorString\0");
        match f {
            // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string.
            Ok(f) => unsafe { CStr::from_ptr(f(code)) }
                .to_string_lossy()
                .into_owned(),
            Err(_) => format!("NVRTC error {code}"),
        }
    }

    fn check(&self, code: NvrtcResult, what: &str) -> Result<()> {
        if code == 0 {
            Ok(())
        } else {
            Err(anyhow!("{what}: {}", self.error_string(code)))
        }
    }

    /// NVRTC's (major, minor) version.
    pub fn version(&self) -> Result<(i32, i32)> {
        let f = self.sym::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult>(
            b"nvrtcVersion\0",
        )?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: both pointers are valid for writes.
        self.check(unsafe { f(&mut major, &mut minor) }, "nvrtcVersion")?;
        Ok((major, minor))
    }

    /// Compiles `source` (named `name` in diagnostics) with `headers` (include name, contents)
    /// available to `#include "name"`. On a compile error the error text carries NVRTC's log.
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        headers: &[(&str, &str)],
        options: &[String],
    ) -> Result<Compiled> {
        let src = CString::new(source).with_context(|| format!("{name} contains a NUL byte"))?;
        let cname = CString::new(name)?;
        let header_src: Vec<CString> = headers
            .iter()
            .map(|(_, s)| CString::new(*s))
            .collect::<Result<_, _>>()?;
        let header_names: Vec<CString> = headers
            .iter()
            .map(|(n, _)| CString::new(*n))
            .collect::<Result<_, _>>()?;
        let header_src_p: Vec<*const c_char> = header_src.iter().map(|c| c.as_ptr()).collect();
        let header_names_p: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
        let opts: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<Result<_, _>>()?;
        let opts_p: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();

        type Create = unsafe extern "C" fn(
            *mut Prog,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> NvrtcResult;
        let create = self.sym::<Create>(b"nvrtcCreateProgram\0")?;
        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live NUL-terminated string owned above.
        self.check(
            unsafe {
                create(
                    &mut prog,
                    src.as_ptr(),
                    cname.as_ptr(),
                    headers.len() as c_int,
                    header_src_p.as_ptr(),
                    header_names_p.as_ptr(),
                )
            },
            "nvrtcCreateProgram",
        )?;
        let guard = ProgGuard { nvrtc: self, prog };

        let compile = self
            .sym::<unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> NvrtcResult>(
                b"nvrtcCompileProgram\0",
            )?;
        // SAFETY: prog is live; the options outlive the call.
        let rc = unsafe { compile(prog, opts_p.len() as c_int, opts_p.as_ptr()) };
        let log = self.read_string(prog, b"nvrtcGetProgramLogSize\0", b"nvrtcGetProgramLog\0")?;
        if rc != 0 {
            bail!(
                "NVRTC failed to compile {name} ({}) with options {options:?}:\n{log}",
                self.error_string(rc)
            );
        }
        let ptx = self.read_string(prog, b"nvrtcGetPTXSize\0", b"nvrtcGetPTX\0")?;
        let cubin = self
            .read_bytes(prog, b"nvrtcGetCUBINSize\0", b"nvrtcGetCUBIN\0")
            .ok()
            .filter(|b| !b.is_empty());
        drop(guard);
        Ok(Compiled { log, ptx, cubin })
    }

    fn read_bytes(&self, prog: Prog, size_fn: &[u8], get_fn: &[u8]) -> Result<Vec<u8>> {
        let size = self.sym::<unsafe extern "C" fn(Prog, *mut usize) -> NvrtcResult>(size_fn)?;
        let get = self.sym::<unsafe extern "C" fn(Prog, *mut c_char) -> NvrtcResult>(get_fn)?;
        let mut n = 0usize;
        // SAFETY: prog is live; n is valid for writes.
        self.check(
            unsafe { size(prog, &mut n) },
            &String::from_utf8_lossy(size_fn),
        )?;
        let mut buf = vec![0u8; n];
        if n > 0 {
            // SAFETY: buf holds the n bytes NVRTC said it would write.
            self.check(
                unsafe { get(prog, buf.as_mut_ptr().cast()) },
                &String::from_utf8_lossy(get_fn),
            )?;
        }
        Ok(buf)
    }

    fn read_string(&self, prog: Prog, size_fn: &[u8], get_fn: &[u8]) -> Result<String> {
        let mut b = self.read_bytes(prog, size_fn, get_fn)?;
        while b.last() == Some(&0) {
            b.pop();
        }
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
}

struct ProgGuard<'a> {
    nvrtc: &'a Nvrtc,
    prog: Prog,
}

impl Drop for ProgGuard<'_> {
    fn drop(&mut self) {
        if let Ok(destroy) = self
            .nvrtc
            .sym::<unsafe extern "C" fn(*mut Prog) -> NvrtcResult>(b"nvrtcDestroyProgram\0")
        {
            // SAFETY: prog came from nvrtcCreateProgram and is destroyed once.
            unsafe { destroy(&mut self.prog) };
        }
    }
}

/// Locations of a CUDA 13 NVRTC and headers unpacked from PyPI wheels (see
/// [`wheel_toolkit`]): `<root>/nvidia/cu13/lib/libnvrtc.so.13` and `<root>/nvidia/cu13/include`.
pub struct WheelToolkit {
    pub lib: PathBuf,
    pub include: PathBuf,
}

/// The wheel layout under `root`, if both the library and `cuda_fp16.h` are there.
pub fn wheel_toolkit(root: &Path) -> Option<WheelToolkit> {
    let base = root.join("nvidia").join("cu13");
    let lib = base.join("lib").join("libnvrtc.so.13");
    let include = base.join("include");
    (lib.is_file() && include.join("cuda_fp16.h").is_file())
        .then_some(WheelToolkit { lib, include })
}
