//! Stable hashes: case ids and the generated values (dummy weights, prompt ids) depend on them, so
//! they must give the same answer on every Rust version, platform and run.

/// 64-bit FNV-1a: tiny, stable across Rust versions and platforms (std's hashers are not).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// SplitMix64's output function: a stateless, well-mixed hash of a counter, so generated values
/// (dummy weights, prompt ids) depend only on their index and can be made in any order.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
