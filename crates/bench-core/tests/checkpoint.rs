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

/// A model over the shard limit is written as HuggingFace shards with an index: every tensor in
/// exactly one shard that the index names, each shard within the limit (a larger tensor alone),
/// and the values those of the single-file form.
#[test]
fn large_checkpoints_are_sharded_with_an_index() {
    use bench_core::checkpoint::{ensure_dummy_checkpoint_in_shards, INDEX_FILE};
    let cache = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("st-shards-{}", std::process::id()));
    let cfg = bench_core::model::lookup("opt-tiny-odd").unwrap();
    let limit = 60_000; // opt-tiny-odd's embedding alone is 159,520 bytes
    let dir = ensure_dummy_checkpoint_in_shards(&cache, &cfg, DEFAULT_SEED, limit).unwrap();
    assert!(!dir.join(WEIGHTS_FILE).exists());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let specs = checkpoint_tensors(&cfg);
    assert_eq!(map.len(), specs.len());
    let files: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(files.len() > 3, "{files:?}");
    let n = files.len();
    for (i, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        let bytes = std::fs::read(dir.join(f)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let data: usize = st.tensors().iter().map(|(_, t)| t.data().len()).sum();
        assert!(
            data as u64 <= limit || st.len() == 1,
            "{f}: {data} bytes in {} tensors",
            st.len()
        );
        for (name, t) in st.tensors() {
            assert_eq!(map[&name], *f, "{name} is where the index says");
            let spec = specs.iter().find(|s| s.name == name).unwrap();
            let got: Vec<f16> = t
                .data()
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]))
                .collect();
            assert_eq!(got, tensor(spec, DEFAULT_SEED), "{name}");
        }
    }
    let total: u64 = specs.iter().map(|s| s.numel() as u64 * 2).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    // A second call finds it complete and writes nothing.
    let before = std::fs::metadata(dir.join(INDEX_FILE))
        .unwrap()
        .modified()
        .unwrap();
    ensure_dummy_checkpoint_in_shards(&cache, &cfg, DEFAULT_SEED, limit).unwrap();
    assert_eq!(
        std::fs::metadata(dir.join(INDEX_FILE))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
    // The single-file form of the same model (an older cache) is complete as well.
    let single = ensure_dummy_checkpoint(&cache.join("single"), &cfg, DEFAULT_SEED).unwrap();
    let moved = cache.join("moved");
    std::fs::create_dir_all(moved.join("dummy")).unwrap();
    std::fs::rename(
        &single,
        moved.join("dummy").join(single.file_name().unwrap()),
    )
    .unwrap();
    let again = ensure_dummy_checkpoint_in_shards(&moved, &cfg, DEFAULT_SEED, limit).unwrap();
    assert!(again.join(WEIGHTS_FILE).is_file() && !again.join(INDEX_FILE).exists());
    std::fs::remove_dir_all(&cache).unwrap();
}
