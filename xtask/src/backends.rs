//! The backend registry: every framework wrapper flexbench can run. Adding a framework is one
//! line here (plus its crate).

use bench_core::Backend;

/// All registered backends, in the order `list` shows them.
pub fn registry() -> Vec<Box<dyn Backend>> {
    vec![
        Box::new(backend_native::NativeBackend),
        Box::new(backend_hf::HfBackend),
        Box::new(backend_deepspeed::DeepSpeedBackend),
    ]
}
