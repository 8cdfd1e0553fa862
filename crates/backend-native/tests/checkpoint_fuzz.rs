//! The checkpoint reader on hostile files: arbitrary bytes where `model.safetensors` should be
//! (random, truncated or with a lying header) never panic, and opening one never allocates much
//! more than the file holds. Runs as its own test binary, with an allocator that counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use backend_native::model::{load_config, Checkpoint};
use proptest::prelude::*;

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const CONFIG: &str = r#"{"model_type":"opt","hidden_size":8,"num_hidden_layers":2,"num_attention_heads":2,
    "ffn_dim":16,"vocab_size":10,"max_position_embeddings":8}"#;

/// Headers that look like safetensors: a length (often a lie) and JSON-ish text.
fn hostile_file() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        Just(r#"{"model.decoder.embed_tokens.weight":{"dtype":"F16","shape":[10,8],"data_offsets":[0,160]}}"#.to_string()),
        Just(r#"{"a":{"dtype":"F16","shape":[18446744073709551615,2],"data_offsets":[0,4]}}"#.to_string()),
        Just(r#"{"a":{"dtype":"F64","shape":[1000000000,1000000000],"data_offsets":[0,18446744073709551615]}}"#.to_string()),
        Just(r#"{"model.decoder.layers.999999999.fc1.weight":{"dtype":"F16","shape":[16,8],"data_offsets":[0,256]}}"#.to_string()),
        "[ -~]{0,200}",
    ];
    (
        prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        header,
        prop::collection::vec(any::<u8>(), 0..512),
        any::<bool>(),
    )
        .prop_map(|(len, header, tail, random)| {
            if random {
                return tail;
            }
            let mut bytes = len.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&tail);
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn hostile_safetensors_never_panic_nor_allocate_past_the_file(bytes in hostile_file()) {
        let dir = std::env::temp_dir().join(format!("flexbench-ckpt-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), CONFIG).unwrap();
        std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let cfg = load_config(&dir).unwrap();
        if let Ok(ckpt) = Checkpoint::open(&dir) {
            let _ = ckpt.check_against(&cfg);
        }
        let grew = PEAK.load(Ordering::Relaxed) - before;
        // The file's bytes (a header is parsed into owned strings) plus bookkeeping.
        prop_assert!(grew <= 8 * bytes.len() + (256 << 10), "{grew} bytes for a {}-byte file", bytes.len());
    }
}
