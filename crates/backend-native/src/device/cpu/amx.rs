//! bf16 matrix products on Intel AMX tiles (`tdpbf16ps`: a 16x16 f32 tile += 16x32 bf16 x 32x16
//! bf16 per instruction), the fast path of the bf16 mode where the CPU has AMX.
//!
//! Written with inline assembly because Rust's AMX intrinsics are not stable. Linux hands AMX
//! state to a process only after `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; without
//! that permission [`available`] is false and the bf16 mode uses AVX-512 BF16 instead.
//! Layout: x as bf16 rows padded to a multiple of 32 columns and 32 rows; W^T packed per panel of
//! 32 output columns as `[k/2][32][2]` (two 16-column B tiles side by side in each 128-byte row).
//! Each task computes 32x32 outputs at a time in four accumulator tiles.

use std::sync::OnceLock;

use half::f16;

use super::shared_out::SharedOut;
use rayon::prelude::*;

const TILE_K: usize = 32; // bf16 values per A-tile row (64 bytes)
const BLOCK: usize = 32; // output rows and columns per pass (2 x 2 tiles of 16)

/// Whether AMX-BF16 is usable by this process (asks the kernel for the tile state once).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // CPUID leaf 7: EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE (the std detection macro
            // for AMX is unstable)
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain syscall asking for a permission; no memory is passed.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

/// W `[m, k]` fp16 packed for [`linear`]: panels of 32 output columns, `[kpad/2][32][2]` bf16
/// (zeros pad m and k). The CPU device packs each weight once and keeps it beside the fp16 copy.
pub fn pack_w(w: &[f16], m: usize, k: usize) -> Vec<u16> {
    let kpad = round_up(k, TILE_K);
    let panels = m.div_ceil(BLOCK);
    let psize = kpad / 2 * BLOCK * 2;
    let mut wp = vec![0u16; panels * psize];
    wp.par_chunks_mut(psize)
        .enumerate()
        .for_each(|(pi, panel)| {
            let mut row = vec![0f32; k];
            for jj in 0..BLOCK.min(m - pi * BLOCK) {
                let j = pi * BLOCK + jj;
                super::convert::f16_to_f32(&w[j * k..(j + 1) * k], &mut row);
                for (p, v) in row.iter().enumerate() {
                    panel[(p / 2) * BLOCK * 2 + jj * 2 + p % 2] = super::bf16::to_bf16_bits(*v);
                }
            }
        });
    wp
}

/// `out[n, m] = bf16(x) · W^T` with W packed by [`pack_w`]. Requires [`available`].
/// `bias` (f32, `[m]`) and `relu` are applied as the tiles are written.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    wp: &[u16],
    bias: Option<&[f32]>,
    relu: bool,
    n: usize,
    k: usize,
    m: usize,
    out: &mut [f32],
) {
    assert!(available(), "AMX matmul called without AMX");
    let kpad = round_up(k, TILE_K);
    let npad = round_up(n, BLOCK);
    let panels = m.div_ceil(BLOCK);
    let psize = kpad / 2 * BLOCK * 2;
    assert_eq!(wp.len(), panels * psize, "packed weight of the wrong size");
    // tasks: (group of row blocks, group of panels). Each converts its rows of x to bf16 in
    // tile order (contiguous 1 KiB A tiles, see simd::round_bf16_tiled) into a buffer of its own,
    // which stays in cache for all its panels (converting into a shared bf16 copy of x first
    // wrote and re-read that copy through memory), loads the tile config once and writes its
    // own disjoint rectangle of `out`, with bias and ReLU applied on the way. Panels are split
    // between tasks only where there are too few row groups to keep every thread busy.
    const ROW_BLOCKS_PER_TASK: usize = 4;
    let row_blocks = npad / BLOCK;
    let groups = row_blocks.div_ceil(ROW_BLOCKS_PER_TASK);
    let want_tasks = 4 * rayon::current_num_threads();
    let pgroups = want_tasks.div_ceil(groups).clamp(1, panels);
    let panels_per_task = panels.div_ceil(pgroups);
    let pgroups = panels.div_ceil(panels_per_task);
    assert!(out.len() >= n * m && bias.is_none_or(|b| b.len() == m));
    let dst = SharedOut(out.as_mut_ptr());
    (0..groups * pgroups).into_par_iter().for_each(|t| {
        let (g, pg) = (t / pgroups, t % pgroups);
        let rb0 = g * ROW_BLOCKS_PER_TASK;
        let rb1 = (rb0 + ROW_BLOCKS_PER_TASK).min(row_blocks);
        let p0 = pg * panels_per_task;
        let p1 = (p0 + panels_per_task).min(panels);
        let r1 = (rb1 * BLOCK).min(n);
        // rows of the last block past n stay zero
        let mut xp = vec![0u16; (rb1 - rb0) * BLOCK * kpad];
        for (o, r) in xp
            .chunks_mut(BLOCK * kpad)
            .zip(x[rb0 * BLOCK * k..r1 * k].chunks(BLOCK * k))
        {
            super::simd::round_bf16_tiled(r, r.len() / k, k, kpad, o);
        }
        let mut c = [0f32; BLOCK * BLOCK];
        // SAFETY: AMX is available; `a` holds 32 rows of kpad bf16, each panel kpad/2 rows of 64
        // bf16 and `c` 32 x 32 f32, as the kernel reads and writes. Writes to `out` stay inside
        // rows r0..min(r0+32, n) and columns j0..min(j0+32, m) of this task's own blocks.
        unsafe {
            kernel::configure();
            for pi in p0..p1 {
                for rb in rb0..rb1 {
                    let a = &xp[(rb - rb0) * BLOCK * kpad..(rb - rb0 + 1) * BLOCK * kpad];
                    kernel::block(
                        a,
                        kernel::TILED,
                        &wp[pi * psize..(pi + 1) * psize],
                        kpad,
                        &mut c,
                    );
                    let (r0, j0) = (rb * BLOCK, pi * BLOCK);
                    let cols = BLOCK.min(m - j0);
                    for i in 0..BLOCK.min(n.saturating_sub(r0)) {
                        let row =
                            std::slice::from_raw_parts_mut(dst.ptr().add((r0 + i) * m + j0), cols);
                        let src = &c[i * BLOCK..i * BLOCK + cols];
                        row.copy_from_slice(src);
                        if bias.is_some() || relu {
                            let b = bias.map_or(&[][..], |b| &b[j0..j0 + cols]);
                            super::simd::bias_act(row, b, relu);
                        }
                    }
                }
            }
            kernel::release();
        }
    });
}

/// This thread's AMX tile state, configured for [`Tiles::block`] while the value lives (it
/// belongs to the thread: not `Send`). For callers that run many small products on one thread,
/// such as attention's per-(sequence, head) products.
pub struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// Configures the tiles on this thread. Requires [`available`].
    pub fn configure() -> Tiles {
        assert!(available(), "AMX tiles requested without AMX");
        // SAFETY: AMX is available; the configuration is this thread's.
        unsafe { kernel::configure() };
        Tiles(std::marker::PhantomData)
    }

    /// `dst[32][32] = a[32 rows][..klen] · panel` with bf16 `a` rows `a_row` values apart and
    /// `panel` packed as [`pack_w`]'s panels (`[klen/2][32][2]`, the first `klen/2` pair rows
    /// read); `klen` is a multiple of 32.
    pub fn block(&self, a: &[u16], a_row: usize, panel: &[u16], klen: usize, dst: &mut [f32]) {
        assert!(klen.is_multiple_of(TILE_K) && klen <= a_row && a_row.is_multiple_of(2));
        assert!(a.len() >= (BLOCK - 1) * a_row + klen, "a: too few rows");
        assert!(
            panel.len() >= klen / 2 * BLOCK * 2,
            "panel: too few pair rows"
        );
        assert!(dst.len() >= BLOCK * BLOCK);
        // SAFETY: tiles are configured (self exists on this thread); the asserts bound every
        // byte the kernel reads and writes.
        unsafe { kernel::block(a, kernel::ALayout::Rows(a_row), panel, klen, dst) }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: releases the state `configure` set up on this thread.
        unsafe { kernel::release() }
    }
}

/// Rounds `v` up to a multiple of 32 (AMX tile rows and bf16 tile columns).
pub fn round32(v: usize) -> usize {
    round_up(v, BLOCK)
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::asm;

    /// Tile configuration: palette 1; tmm0-3 = C (16 rows x 64 bytes), tmm4-5 = A (16 x 64),
    /// tmm6-7 = B (16 x 64).
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    fn config() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        TileConfig(c)
    }

    /// Loads the tile configuration on this thread.
    pub unsafe fn configure() {
        let cfg = config();
        asm!("ldtilecfg [{cfg}]", cfg = in(reg) &cfg as *const TileConfig);
    }

    /// Releases this thread's tile state.
    pub unsafe fn release() {
        asm!("tilerelease");
    }

    /// Layout of the 32 rows of A.
    #[derive(Clone, Copy)]
    pub enum ALayout {
        /// Plain rows, this many values apart.
        Rows(usize),
        /// Tile order: `[k/32][32 rows][32]` (simd::round_bf16_tiled).
        Tiled,
    }
    pub const TILED: ALayout = ALayout::Tiled;

    /// `dst[32][32] = a[32][..klen] · panel[..klen/2]` (bf16 in, f32 out), `klen` a multiple
    /// of 32. Needs [`configure`] first.
    pub unsafe fn block(a: &[u16], layout: ALayout, panel: &[u16], klen: usize, dst: &mut [f32]) {
        // bytes between rows, from rows 0-15 to rows 16-31, and from one k block to the next
        let (a_stride, a_half, a_step) = match layout {
            ALayout::Rows(r) => (r * 2, 16 * r * 2, 64),
            ALayout::Tiled => (64, 1024, 2048),
        };
        let b_stride = 128usize; // bytes per packed pair-row of the panel (32 columns)
        let c_stride = 128usize; // bytes per output row (32 f32)
        let ap = a.as_ptr() as *const u8;
        let bp = panel.as_ptr() as *const u8;
        let cp = dst.as_mut_ptr() as *mut u8;
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3"
        );
        for k0 in (0..klen).step_by(super::TILE_K) {
            let a0 = ap.add(k0 / super::TILE_K * a_step);
            let a1 = a0.add(a_half);
            let b0 = bp.add((k0 / 2) * b_stride);
            let b1 = b0.add(64);
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                sa = in(reg) a_stride,
                sb = in(reg) b_stride,
            );
        }
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            c0 = in(reg) cp,
            c1 = in(reg) cp.add(64),
            c2 = in(reg) cp.add(16 * c_stride),
            c3 = in(reg) cp.add(16 * c_stride + 64),
            sc = in(reg) c_stride,
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    pub unsafe fn configure() {}
    pub unsafe fn release() {}
    #[derive(Clone, Copy)]
    pub enum ALayout {
        Rows(usize),
        Tiled,
    }
    pub const TILED: ALayout = ALayout::Tiled;
    pub unsafe fn block(_: &[u16], _: ALayout, _: &[u16], _: usize, _: &mut [f32]) {
        unreachable!("amx::available() is false off x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rounded_reference() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 for this process");
            return;
        }
        for &(n, k, m) in &[
            (1, 2, 1),
            (17, 33, 70),
            (32, 64, 32),
            (70, 100, 65),
            (40, 48, 31),
            (300, 70, 200), // several row groups and panels per task
        ] {
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0)
                .collect();
            let w: Vec<f16> = (0..m * k)
                .map(|i| f16::from_f32(((i * 53 % 89) as f32 - 44.0) / 61.0))
                .collect();
            let mut out = vec![0f32; n * m];
            linear(&x, &pack_w(&w, m, k), None, false, n, k, m, &mut out);
            let r = super::super::bf16::reference(&x, &w, n, k, m);
            let scale = r.iter().fold(0f32, |a, b| a.max(b.abs()));
            let err = out
                .iter()
                .zip(&r)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()))
                / scale;
            assert!(err < 1e-5, "n={n} k={k} m={m}: {err}");
        }
    }
}
