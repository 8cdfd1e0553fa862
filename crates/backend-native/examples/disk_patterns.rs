//! The offloader's weight reads without compute, against the reference read of the same files:
//! `cargo run --release -p backend-native --example disk_patterns DIR [MODEL]`.
//! Tells whether a gap between decode's read rate and the disk's is in the reader itself or in
//! running beside compute. Each round runs every pattern once, so the disk's drift hits them
//! alike: the reference (one 16 MiB request at a time into one buffer), the same requests into
//! destinations rotating through 512 MiB, 4 lanes into 4 hot 16 MiB slots, 4 lanes pulling
//! from one list across all files (no drain at a unit's end), the reference beside
//! a thread streaming memory, the engine's unit reads (and with their copies to the compute
//! device), and the engine's 4-lane reader on whole files. On this machine's virtual disk the
//! reference swings between 1.3 and 2.5 GB/s from round to round, and the destinations'
//! footprint matters (rotating buffers were 10-35% slower than one hot buffer in every round);
//! every 4-lane pattern, with or without a drain per file, read 1.5-1.8 GB/s.
use std::time::Instant;

use backend_native::device::cpu::{CpuDevice, CpuOptions};
use backend_native::disk_speed::{reference_beside_memory_load, weight_files};
use backend_native::model::DummySource;
use backend_native::offload::direct::sequential_read;
use backend_native::schedule::OffloadModel;
use bench_core::Policy;

// the runner's allocator, so that memory behaves as in `flexbench-native`
#[global_allocator]
static ALLOC: backend_native::huge_alloc::HugePageAlloc = backend_native::huge_alloc::HugePageAlloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let name = args.get(2).map_or("opt-1.3b", |s| s.as_str());
    let cfg = bench_core::model::lookup(name).unwrap();
    let dev = CpuDevice::new(CpuOptions::default());
    let policy = Policy::new([0, 0, 100, 0, 100, 0]);
    let src = DummySource::new(&cfg, bench_core::dummy::DEFAULT_SEED);
    let model = OffloadModel::load(&dev, &src, &cfg, &policy, Some(&dir), 0).unwrap();
    let files = weight_files(model.offload_dir().unwrap()).unwrap();
    let w = &model.weights;
    let mut big = backend_native::offload::direct::AlignedBuf::new(4096).unwrap();
    let mut ring = backend_native::offload::direct::AlignedBuf::new(512 << 20).unwrap();
    let mut slots = backend_native::offload::direct::AlignedBuf::new(64 << 20).unwrap();
    for round in 0..4 {
        let (b, s) = sequential_read(&files, 16 << 20).unwrap();
        let reference = b as f64 / s / 1e9;
        let mut in_reads = 0.0;
        let mut bytes = 0u64;
        for u in 0..w.num_units() {
            let b0 = model
                .stats
                .bytes(backend_native::offload::stats::Link::DiskRead);
            let t = Instant::now();
            let d = w.read_disk(&dev, u).unwrap();
            in_reads += t.elapsed().as_secs_f64();
            // the copy returns the read buffer to the pool, as in generation
            drop(w.materialize(&dev, u, Some(d)).unwrap());
            bytes += model
                .stats
                .bytes(backend_native::offload::stats::Link::DiskRead)
                - b0;
        }
        let reads = bytes as f64 / in_reads / 1e9;
        let t = Instant::now();
        for u in 0..w.num_units() {
            drop(w.fetch(&dev, u).unwrap());
        }
        let fetches = bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
        // the engine's reader (4 lanes of 16 MiB requests) on whole files, into one buffer
        let t = Instant::now();
        let mut fb = 0u64;
        for f in &files {
            let df = backend_native::offload::direct::DirectFile::open_read(f).unwrap();
            let len = df.size().unwrap() as usize;
            if big.len() < len {
                big = backend_native::offload::direct::AlignedBuf::new(len).unwrap();
            }
            df.read_at(&mut big, len, 0).unwrap();
            fb += len as u64;
        }
        let lanes = fb as f64 / t.elapsed().as_secs_f64() / 1e9;
        // the reference read beside a thread streaming memory (as decode's matrix products do)
        let busy = reference_beside_memory_load(&files, 16 << 20).unwrap();
        // the reference's requests, into destinations rotating through 512 MiB
        let t = Instant::now();
        let mut rb = 0u64;
        let mut slot = 0usize;
        for f in &files {
            let df = backend_native::offload::direct::DirectFile::open_read(f).unwrap();
            let len = df.size().unwrap() as usize;
            let mut off = 0;
            while off < len {
                let n = (16usize << 20).min(len - off);
                let n = n.div_ceil(4096) * 4096;
                let at = (slot % 32) * (16 << 20);
                df.read_chunk(&mut ring.bytes_mut()[at..at + n], off as u64)
                    .unwrap();
                slot += 1;
                off += n;
                rb += n as u64;
            }
        }
        let rotating = rb as f64 / t.elapsed().as_secs_f64() / 1e9;
        // 4 lanes of 16 MiB requests, each lane into its own 16 MiB slot (a small hot footprint)
        let t = Instant::now();
        let mut sb = 0u64;
        for f in &files {
            let df = backend_native::offload::direct::DirectFile::open_read(f).unwrap();
            let len = df.size().unwrap() as usize;
            let next = std::sync::atomic::AtomicUsize::new(0);
            let base = slots.bytes_mut().as_mut_ptr() as usize;
            std::thread::scope(|sc| {
                for lane in 0..4 {
                    let (df, next) = (&df, &next);
                    sc.spawn(move || loop {
                        let off = next.fetch_add(16 << 20, std::sync::atomic::Ordering::Relaxed);
                        if off >= len {
                            break;
                        }
                        let n = ((16usize << 20).min(len - off)).div_ceil(4096) * 4096;
                        // SAFETY: lane `lane` owns slot `lane`
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut((base + lane * (16 << 20)) as *mut u8, n)
                        };
                        df.read_chunk(dst, off as u64).unwrap();
                    });
                }
            });
            sb += len as u64;
        }
        let slotted = sb as f64 / t.elapsed().as_secs_f64() / 1e9;
        println!("round {round}: reference requests into 512 MiB of rotating buffers {rotating:.3} GB/s; 4 lanes into 4 hot 16 MiB slots {slotted:.3} GB/s");
        // 4 lanes pulling 16 MiB requests from one list across all files (the queue never drains
        // at a file's end), each lane into its own slot
        let t = Instant::now();
        let opened: Vec<_> = files
            .iter()
            .map(|f| backend_native::offload::direct::DirectFile::open_read(f).unwrap())
            .collect();
        let mut list = vec![];
        for (fi, df) in opened.iter().enumerate() {
            let len = df.size().unwrap() as usize;
            for off in (0..len).step_by(16 << 20) {
                list.push((
                    fi,
                    off,
                    ((16usize << 20).min(len - off)).div_ceil(4096) * 4096,
                ));
            }
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let base = slots.bytes_mut().as_mut_ptr() as usize;
        std::thread::scope(|sc| {
            for lane in 0..4 {
                let (opened, list, next) = (&opened, &list, &next);
                sc.spawn(move || loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(fi, off, n)) = list.get(i) else {
                        break;
                    };
                    // SAFETY: lane `lane` owns slot `lane`
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut((base + lane * (16 << 20)) as *mut u8, n)
                    };
                    opened[fi].read_chunk(dst, off as u64).unwrap();
                });
            }
        });
        let across =
            list.iter().map(|c| c.2 as u64).sum::<u64>() as f64 / t.elapsed().as_secs_f64() / 1e9;
        println!("round {round}: 4 lanes across files {across:.3} GB/s");
        println!(
            "round {round}: reference {reference:.3} GB/s, beside memory streaming {busy:.3} GB/s; \
             engine's unit reads {reads:.3} GB/s, reads + copies {fetches:.3} GB/s, 4-lane reader \
             on whole files {lanes:.3} GB/s"
        );
    }
}
