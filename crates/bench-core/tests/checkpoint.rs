//! The shared dummy checkpoint read back by the `safetensors` crate (the format's reference
//! implementation): every tensor, name, shape and value exactly as the generator defines them.

use bench_core::checkpoint::{ensure_dummy_checkpoint, WEIGHTS_FILE};
use bench_core::dummy::{tensor, DEFAULT_SEED};
use bench_core::model::layout::checkpoint_tensors;
use half::f16;
use safetensors::{Dtype, SafeTensors};

#[test]
fn safetensors_crate_reads_exact_values() {
    let cache = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("st-{}", std::process::id()));
    for model in ["opt-tiny", "opt-tiny-postln"] {
        let cfg = bench_core::model::lookup(model).unwrap();
        let dir = ensure_dummy_checkpoint(&cache, &cfg, DEFAULT_SEED).unwrap();
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let specs = checkpoint_tensors(&cfg);
        assert_eq!(st.len(), specs.len());
        for spec in &specs {
            let t = st.tensor(&spec.name).unwrap();
            assert_eq!(t.dtype(), Dtype::F16);
            assert_eq!(t.shape(), &spec.shape[..]);
            let got: Vec<f16> = t
                .data()
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]))
                .collect();
            assert_eq!(got, tensor(spec, DEFAULT_SEED), "{model}: {}", spec.name);
        }
    }
    std::fs::remove_dir_all(&cache).unwrap();
}
