use std::time::Instant;
fn main() {
    rayon::scope(|_| run());
}
fn run() {
    for &(n, k, m) in &[
        (512, 768, 768),
        (512, 768, 2304),
        (512, 768, 3072),
        (512, 3072, 768),
        (4096, 768, 768),
        (4096, 768, 2304),
    ] {
        let x: Vec<f32> = (0..n * k).map(|i| (i % 17) as f32 * 0.01).collect();
        let w: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
        let mut out = vec![0f32; n * m];
        let mut best = f64::INFINITY;
        for _ in 0..20 {
            let t = Instant::now();
            unsafe {
                gemm::gemm(
                    n,
                    m,
                    k,
                    out.as_mut_ptr(),
                    1,
                    m as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                )
            };
            best = best.min(t.elapsed().as_secs_f64());
        }
        let mut best2 = f64::INFINITY;
        for _ in 0..20 {
            let t = Instant::now();
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    m as isize,
                    1,
                    false,
                    w.as_ptr(),
                    1,
                    k as isize,
                    x.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                )
            };
            best2 = best2.min(t.elapsed().as_secs_f64());
        }
        let mut best3 = f64::INFINITY;
        #[derive(Clone, Copy)]
        struct P(*mut f32);
        unsafe impl Send for P {}
        unsafe impl Sync for P {}
        let op = P(out.as_mut_ptr());
        let parts = std::env::var("PARTS").map_or(2, |v| v.parse().unwrap());
        for _ in 0..20 {
            let t = Instant::now();
            use rayon::prelude::*;
            let mc = m / parts;
            (0..parts).into_par_iter().for_each(|c| {
                let op = op;
                let j0 = c * mc;
                unsafe {
                    gemm::gemm(
                        n,
                        mc,
                        k,
                        op.0.add(j0),
                        1,
                        m as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        w.as_ptr().add(j0 * k),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            });
            best3 = best3.min(t.elapsed().as_secs_f64());
        }
        println!("  split m: {:.0}", 2.0 * (n * k * m) as f64 / best3 / 1e9);
        println!(
            "n={n} k={k} m={m}: {:.3} ms {:.0} GFLOP/s; transposed {:.0}",
            best * 1e3,
            2.0 * (n * k * m) as f64 / best / 1e9,
            2.0 * (n * k * m) as f64 / best2 / 1e9
        );
    }
}
