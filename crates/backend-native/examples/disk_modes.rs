//! O_DIRECT read rates of one file in the request patterns the offloader could use:
//! `cargo run --release -p backend-native --example disk_modes DIR [GIB] [UNIT_MIB]`.
//! Reads the file in units of UNIT_MIB (as the engine reads one layer at a time); each unit is
//! split into chunks that `lanes` threads pull from a shared counter, for several (lanes, chunk)
//! pairs, interleaved over rounds so the disk's drift affects them alike.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use backend_native::offload::direct::{AlignedBuf, OffloadDir};

// the runner's allocator, so that memory behaves as in `flexbench-native`
#[global_allocator]
static ALLOC: backend_native::huge_alloc::HugePageAlloc = backend_native::huge_alloc::HugePageAlloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let gib: usize = args.get(2).map_or(2, |s| s.parse().unwrap());
    let unit = (args.get(3).map_or(100, |s| s.parse::<usize>().unwrap()) << 20) / 4096 * 4096;
    let d = OffloadDir::open(&dir, (gib as u64) << 30).unwrap();
    let f = d.file("scratch.bin").unwrap();
    let len = gib << 30;
    let mut buf = AlignedBuf::new(64 << 20).unwrap();
    buf.bytes_mut()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    for off in (0..len).step_by(64 << 20) {
        f.write_at(&buf, 64 << 20, off as u64).unwrap();
    }
    let mut ubuf = AlignedBuf::new(unit).unwrap();
    let modes: &[(usize, usize)] = &[
        (1, 16),
        (1, 4),
        (1, 64),
        (1, 1 << 20),
        (2, 16),
        (4, 16),
        (2, 4),
        (4, 4),
    ];
    let mut rates = vec![vec![]; modes.len()];
    for _ in 0..3 {
        for (mi, &(lanes, chunk_mib)) in modes.iter().enumerate() {
            let chunk = (chunk_mib << 20).min(unit);
            let t = Instant::now();
            let mut off = 0;
            while off + unit <= len {
                let next = AtomicUsize::new(0);
                let ptr = ubuf.bytes_mut().as_mut_ptr() as usize;
                std::thread::scope(|s| {
                    for _ in 0..lanes {
                        s.spawn(|| loop {
                            let start = next.fetch_add(1, Ordering::Relaxed) * chunk;
                            if start >= unit {
                                break;
                            }
                            let n = chunk.min(unit - start);
                            // SAFETY: chunks are disjoint ranges of ubuf
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut((ptr + start) as *mut u8, n)
                            };
                            f.read_chunk(dst, (off + start) as u64).unwrap();
                        });
                    }
                });
                off += unit;
            }
            rates[mi].push(off as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    for (&(lanes, chunk), r) in modes.iter().zip(&rates) {
        let c = if chunk >= 1 << 20 {
            "whole unit".to_string()
        } else {
            format!("{chunk} MiB")
        };
        println!(
            "{lanes} lane(s), {c:>10} requests: {}",
            r.iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}
