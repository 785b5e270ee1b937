//! loft's own single-threaded f32 matrix product for AVX-512 CPUs (the convolutions' GEMMs).
//!
//! The gemm crate reaches AVX-512 only on a nightly compiler, so on a stable build it runs
//! 8-wide AVX2 kernels: half of what an AVX-512 core does. This file is a BLIS-style SGEMM
//! with 16-wide register tiles, used for every single-threaded f32 product when the CPU has
//! AVX-512F (checked once at run time; `LOFT_SIMD=off` or `LOFT_GEMM=crate` keep the gemm
//! crate).
//!
//! Layout: `C (m, n) (+)= A (m, k) B (k, n)` with arbitrary element strides. B is packed
//! into strips of `NR = 16 NV` columns, A into strips of `MR` rows (both zero-padded to
//! full strips); the micro-kernel holds an `MR x NR` tile of C in `MR * NV` zmm registers
//! and, per k, loads `NV` vectors of B and broadcasts `MR` values of A. Three tile shapes
//! (24 x 16, 12 x 32, 8 x 48: 24 accumulators each) are chosen by the least padded work;
//! a product whose `n` is small against `m` is computed as its transpose.
//!
//! Determinism: each element of C is summed by one call in a fixed order (k blocks in
//! order, each from zero, added to C), whatever the caller's threading; the bits depend on
//! the shape only.

use super::scratch::Line;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Whether the AVX-512 product runs: the CPU has AVX-512F and neither `LOFT_SIMD=off` nor
/// `LOFT_GEMM=crate` is set.
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("LOFT_SIMD").is_ok_and(|v| v == "off")
            || std::env::var("LOFT_GEMM").is_ok_and(|v| v == "crate")
        {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// A strided f32 operand: element (i, j) at `ptr + i rs + j cs`.
#[derive(Clone, Copy)]
pub struct Strided {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// Rows of C computed per A block (a multiple of every `MR`).
const MC: usize = 192;
/// Columns of C per B block (a multiple of every `NR`): the block is `KC x NC` floats, at
/// most 0.75 MiB, held in L2.
const NC: usize = 1536;

/// From this depth on, a product whose A rows and B columns both run along k (`A Bᵀ` of
/// row-major matrices: the filter gradients) is computed as dot products, without packing.
const DOT_MIN_K: usize = 128;
/// Up to this `m + n`: a k block of A and B (`(m + n) 1024` floats) stays in L2. Larger
/// products pack (their packing is amortised over many rows and columns).
const DOT_MAX_MN: usize = 384;

/// Above this many rows of C, B is packed even when its rows are contiguous: each strip is
/// then reused by more than a few row strips of A.
const PACK_B_FROM_M: usize = 48;

/// K per block for a tile `NV` vectors wide: a B strip of `KC x 16 NV` floats is 24 KiB,
/// half of L1.
const fn kc_for(nv: usize) -> usize {
    384 / nv
}

thread_local! {
    /// This thread's packing buffers (A block, B block), kept between calls.
    static PACK: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The padded work of an `(m, n)` product with tiles `mr x nr`.
fn padded(m: usize, n: usize, mr: usize, nr: usize) -> usize {
    m.div_ceil(mr) * mr * n.div_ceil(nr) * nr
}

/// The tile widths (in vectors) the kernels come in, with their heights.
const SHAPES: [(usize, usize); 3] = [(3, 8), (2, 12), (1, 24)];

/// The best tile width for an `(m, n)` product and its padded work.
fn best_shape(m: usize, n: usize) -> (usize, usize) {
    SHAPES
        .iter()
        .map(|&(nv, mr)| (nv, padded(m, n, mr, 16 * nv)))
        .min_by_key(|&(_, w)| w)
        .expect("three shapes")
}

/// `C (m, n) (+)= A (m, k) B (k, n)`; `c` is C's element (0, 0) with strides `(rs_c, cs_c)`.
///
/// # Safety
/// [`available`] must be true; every element of A, B and C that the shapes and strides
/// address must be valid (C for writes), and no other thread may touch C meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    rs_c: usize,
    cs_c: usize,
    a: Strided,
    b: Strided,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) is inside C (caller's contract).
                    unsafe { *c.add(i * rs_c + j * cs_c) = 0.0 };
                }
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if a.cs == 1 && b.rs == 1 && k >= DOT_MIN_K && m + n <= DOT_MAX_MN {
        // SAFETY: forwarded to the caller.
        unsafe { dot::dot_product(m, n, k, c, rs_c, cs_c, a, b, accumulate) };
        return;
    }
    // Cᵀ = Bᵀ Aᵀ when the transposed product pads less (a narrow C: few columns, many rows)
    let (nv, work) = best_shape(m, n);
    let (nv_t, work_t) = best_shape(n, m);
    #[cfg(target_arch = "x86_64")]
    {
        let swap = |s: Strided| Strided {
            ptr: s.ptr,
            rs: s.cs,
            cs: s.rs,
        };
        // SAFETY: forwarded to the caller; the transposed call addresses the same elements.
        unsafe {
            if work_t * 10 < work * 9 {
                blocked(nv_t, n, m, k, c, cs_c, rs_c, swap(b), swap(a), accumulate)
            } else {
                blocked(nv, m, n, k, c, rs_c, cs_c, a, b, accumulate)
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (nv, work, nv_t, work_t, c, rs_c, cs_c, a, b, accumulate);
        unreachable!("sgemm: AVX-512 only")
    }
}

/// The blocked loops around the micro-kernel of width `nv`.
///
/// # Safety
/// As for [`sgemm`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn blocked(
    nv: usize,
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    rs_c: usize,
    cs_c: usize,
    a: Strided,
    b: Strided,
    accumulate: bool,
) {
    PACK.with(|p| {
        let (abuf, bbuf) = &mut *p.borrow_mut();
        // SAFETY: forwarded.
        unsafe {
            match nv {
                1 => blocked_nv::<24, 1>(m, n, k, c, rs_c, cs_c, a, b, accumulate, abuf, bbuf),
                2 => blocked_nv::<12, 2>(m, n, k, c, rs_c, cs_c, a, b, accumulate, abuf, bbuf),
                _ => blocked_nv::<8, 3>(m, n, k, c, rs_c, cs_c, a, b, accumulate, abuf, bbuf),
            }
        }
    })
}

/// Grow `buf` to hold `floats` (kept for later calls).
fn reserve(buf: &mut Vec<Line>, floats: usize) {
    let lines = floats.div_ceil(16);
    if buf.len() < lines {
        buf.resize(lines, Line::default());
    }
}

/// # Safety
/// As for [`sgemm`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn blocked_nv<const MR: usize, const NV: usize>(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    rs_c: usize,
    cs_c: usize,
    a: Strided,
    b: Strided,
    accumulate: bool,
    abuf: &mut Vec<Line>,
    bbuf: &mut Vec<Line>,
) {
    let nr = 16 * NV;
    let kc_max = kc_for(NV);
    let mc_max = MC / MR * MR;
    reserve(abuf, mc_max.min(m.div_ceil(MR) * MR) * kc_max.min(k));
    let b_in_place = b.cs == 1 && m <= PACK_B_FROM_M;
    if !b_in_place {
        reserve(bbuf, NC.min(n.div_ceil(nr) * nr) * kc_max.min(k));
    }
    let ap = abuf.as_mut_ptr() as *mut f32;
    let direct_a = a.rs == 1;
    let bp = bbuf.as_mut_ptr() as *mut f32;
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - pc);
            let load = accumulate || pc > 0;
            // B's rows are read in place when contiguous and m is small (packing would cost
            // as much as the product), else packed into strips: a strip read in place from
            // rows a multiple of 4 KiB apart maps onto two L1 sets and thrashes them
            let direct = b_in_place;
            let bsrc = b.ptr.wrapping_add(pc * b.rs + jc * b.cs);
            if !direct {
                // SAFETY: the block lies inside B; bbuf holds ceil(nc / nr) nr kc floats.
                unsafe { pack(kc, nc, nr, bsrc, b.rs, b.cs, bp) };
            }
            for ic in (0..m).step_by(mc_max) {
                let mc = mc_max.min(m - ic);
                let asrc = a.ptr.wrapping_add(ic * a.rs + pc * a.cs);
                if !direct_a {
                    // SAFETY: the block lies inside A; abuf holds ceil(mc / MR) MR kc floats.
                    unsafe { pack(kc, mc, MR, asrc, a.cs, a.rs, ap) };
                }
                for jr in (0..nc).step_by(nr) {
                    let cols = nr.min(nc - jr);
                    let (strip, brs) = if direct {
                        (bsrc.wrapping_add(jr), b.rs)
                    } else {
                        (bp.wrapping_add(jr * kc) as *const f32, nr)
                    };
                    for ir in (0..mc).step_by(MR) {
                        let rows = MR.min(mc - ir);
                        // A's columns are read in place when contiguous (full strips; a
                        // partial one is packed so that no row past m is read)
                        let (astrip, acs) = if !direct_a {
                            (ap.wrapping_add(ir * kc) as *const f32, MR)
                        } else if rows == MR {
                            (asrc.wrapping_add(ir), a.cs)
                        } else {
                            // SAFETY: rows ir.. < mc of the block; abuf holds MR kc floats.
                            unsafe { pack(kc, rows, MR, asrc.add(ir), a.cs, 1, ap) };
                            (ap as *const f32, MR)
                        };
                        // SAFETY: the strips are inside the packed blocks; the C tile's
                        // rows and columns are inside C.
                        unsafe {
                            kernel::<MR, NV>(
                                kc,
                                astrip,
                                acs,
                                strip,
                                brs,
                                c.add((ic + ir) * rs_c + (jc + jr) * cs_c),
                                rs_c,
                                cs_c,
                                rows,
                                cols,
                                load,
                            )
                        };
                    }
                }
            }
        }
    }
}

/// Pack a block into strips of `width` lanes along one direction, for `kc` steps along the
/// other: strip s holds, for each step p, the `width` values at `src + p step + (s width +
/// i) lane` (zero past lane `len`). B packs as (rows p, columns lanes): `step = rs`, `lane =
/// cs`; A as (columns p, rows lanes): `step = cs`, `lane = rs`. Each 16 lanes are one masked
/// load when the lanes are contiguous (`lane == 1`), else one gather.
///
/// # Safety
/// Every `src[p step + j lane]` with p < kc, j < len must be readable; `dst` must hold
/// `ceil(len / width) width kc` floats; `16 lane < 2^31`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack(kc: usize, len: usize, width: usize, src: *const f32, step: usize, lane: usize, dst: *mut f32) {
    use std::arch::x86_64::*;
    let index = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(lane as i32),
    );
    for (s, j0) in (0..len).step_by(width).enumerate() {
        let lanes = width.min(len - j0);
        // SAFETY: strip s is inside dst (caller's size).
        let strip = unsafe { dst.add(s * width * kc) };
        for p in 0..kc {
            for h in (0..width).step_by(16) {
                let keep = lane_mask(width, h);
                let valid = lane_mask(lanes, h);
                // SAFETY: the valid lanes address step p < kc, lanes j0 + h.. < j0 + lanes
                // of the block; the kept lanes at p width + h are inside the strip.
                unsafe {
                    let base = src.add(p * step + (j0 + h) * lane);
                    let v = if lane == 1 {
                        _mm512_maskz_loadu_ps(valid, base)
                    } else {
                        _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), valid, index, base)
                    };
                    _mm512_mask_storeu_ps(strip.add(p * width + h), keep, v);
                }
            }
        }
    }
}

/// `C[0..rows, 0..cols] (load ? += : =) A (MR, kc) · B (kc, cols)` for one tile: A's column
/// p is the MR values at `ap + p acs`, B's row p at `bp + p brs` (packed strips, or the
/// operands themselves).
///
/// # Safety
/// `ap[p acs + i]` is readable for p < kc, i < MR; `bp[p brs + j]` is readable for p < kc, j < cols; C's tile
/// elements `(i, j)` with i < rows <= MR, j < cols <= 16 NV are valid for reads and writes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const MR: usize, const NV: usize>(
    kc: usize,
    ap: *const f32,
    acs: usize,
    bp: *const f32,
    brs: usize,
    c: *mut f32,
    rs_c: usize,
    cs_c: usize,
    rows: usize,
    cols: usize,
    load: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let masks: [__mmask16; NV] = std::array::from_fn(|v| lane_mask(cols, 16 * v));
    for p in 0..kc {
        // SAFETY: p < kc: the unmasked lanes are B's columns < cols of row p; the scalars
        // lie in the A strip.
        unsafe {
            let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], bp.add(p * brs + 16 * v)));
            let arow = ap.add(p * acs);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*arow.add(i));
                for v in 0..NV {
                    row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
                }
            }
        }
    }
    if cs_c == 1 {
        for (i, row) in acc.iter().enumerate().take(rows) {
            for (v, &x) in row.iter().enumerate() {
                let j = 16 * v;
                if j >= cols {
                    break;
                }
                let mask = masks[v];
                // SAFETY: the masked lanes are columns j.. < cols of row i < rows of C.
                unsafe {
                    let dst = c.add(i * rs_c + j);
                    let val = if load {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), x)
                    } else {
                        x
                    };
                    _mm512_mask_storeu_ps(dst, mask, val);
                }
            }
        }
    } else {
        let mut tile = [[0.0f32; 16]; 3];
        for (i, row) in acc.iter().enumerate().take(rows) {
            for (v, &x) in row.iter().enumerate() {
                // SAFETY: tile[v] holds 16 floats.
                unsafe { _mm512_storeu_ps(tile[v].as_mut_ptr(), x) };
            }
            for j in 0..cols {
                // SAFETY: (i, j) is inside C's tile.
                unsafe {
                    let dst = c.add(i * rs_c + j * cs_c);
                    let val = tile[j / 16][j % 16];
                    *dst = if load { *dst + val } else { val };
                }
            }
        }
    }
}

/// The lanes of the vector starting at column `j` that are below `cols`.
fn lane_mask(cols: usize, j: usize) -> u16 {
    match cols.saturating_sub(j) {
        0 => 0,
        r if r >= 16 => 0xffff,
        r => (1u16 << r) - 1,
    }
}

#[cfg(target_arch = "x86_64")]
mod dot {
    //! `A Bᵀ` with both operands contiguous along k: each element of C a dot product.
    use super::{lane_mask, Strided};
    use std::arch::x86_64::*;

    /// Rows and columns of C per register tile (24 accumulators, 10 loads per 16 k).
    const TR: usize = 4;
    const _: () = assert!(TR == 4, "sum4 reduces four rows");
    const TC: usize = 6;
    /// K per block: a tile's 6 columns of B (24 KiB) stay in L1, the block of A in L2;
    /// each block's dot products are reduced and added to C.
    const KB: usize = 1024;

    /// The lane sums of four vectors, `[Σa, Σb, Σc, Σd]`, by a transposing add tree (about
    /// three instructions per sum instead of ten for four separate reductions).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sum4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        // per 128-bit lane: [a, b, c, d], each the sum of its four values
        let s = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(ab, cd),
            _mm512_shuffle_ps::<0b11_10_11_10>(ab, cd),
        );
        // the four 128-bit lanes added
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
        let s8 = _mm256_add_ps(_mm512_castps512_ps256(s), hi);
        _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8))
    }

    /// `C (m, n) (+)= A (m, k) B (k, n)` with `a.cs == 1` and `b.rs == 1`.
    ///
    /// # Safety
    /// As for [`super::sgemm`], with AVX-512F present.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_product(
        m: usize,
        n: usize,
        k: usize,
        c: *mut f32,
        rs_c: usize,
        cs_c: usize,
        a: Strided,
        b: Strided,
        accumulate: bool,
    ) {
        for pc in (0..k).step_by(KB) {
            let kc = KB.min(k - pc);
            let load = accumulate || pc > 0;
            // B's columns of a tile stay in L1 while A's rows stream from L2
            for j0 in (0..n).step_by(TC) {
                let cols = TC.min(n - j0);
                for i0 in (0..m).step_by(TR) {
                    let rows = TR.min(m - i0);
                    // rows and columns past the edge repeat the last one; they are not stored
                    let ar: [*const f32; TR] =
                        std::array::from_fn(|r| a.ptr.wrapping_add((i0 + r.min(rows - 1)) * a.rs + pc));
                    let bc: [*const f32; TC] =
                        std::array::from_fn(|s| b.ptr.wrapping_add((j0 + s.min(cols - 1)) * b.cs + pc));
                    let mut acc = [[_mm512_setzero_ps(); TC]; TR];
                    for q in (0..kc).step_by(16) {
                        let mask = lane_mask(kc, q);
                        // SAFETY: the unmasked lanes are k indices pc + q.. < pc + kc of rows
                        // and columns inside A and B.
                        unsafe {
                            let av: [__m512; TR] = std::array::from_fn(|r| _mm512_maskz_loadu_ps(mask, ar[r].add(q)));
                            for (s, &col) in bc.iter().enumerate() {
                                let bv = _mm512_maskz_loadu_ps(mask, col.add(q));
                                for r in 0..TR {
                                    acc[r][s] = _mm512_fmadd_ps(av[r], bv, acc[r][s]);
                                }
                            }
                        }
                    }
                    let [r0, r1, r2, r3] = &acc;
                    let columns = r0.iter().zip(r1).zip(r2).zip(r3);
                    for (s, (((&v0, &v1), &v2), &v3)) in columns.enumerate().take(cols) {
                        let mut sums = [0.0f32; TR];
                        // SAFETY: sums holds the 4 floats of one __m128.
                        unsafe { _mm_storeu_ps(sums.as_mut_ptr(), sum4(v0, v1, v2, v3)) };
                        for (r, &sum) in sums.iter().enumerate().take(rows) {
                            // SAFETY: (i0 + r, j0 + s) is inside C.
                            unsafe {
                                let dst = c.add((i0 + r) * rs_c + (j0 + s) * cs_c);
                                *dst = if load { *dst + sum } else { sum };
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::gemm::{matmul, Mat};

    /// `C (+)= A B` against an f64 reference, for strided operands in both orientations.
    fn check(m: usize, n: usize, k: usize, ta: bool, tb: bool, accumulate: bool) {
        let a: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i as f32) * 0.11).cos()).collect();
        let (ars, acs) = if ta { (1, m) } else { (k, 1) };
        let (brs, bcs) = if tb { (1, k) } else { (n, 1) };
        let ld = n + 3;
        let mut c: Vec<f32> = (0..m * ld).map(|i| (i % 7) as f32).collect();
        let before = c.clone();
        // through the backend's entry point: this kernel where the CPU has AVX-512F, else
        // the gemm crate (the product every f32 convolution uses on this machine)
        let am = Mat {
            data: &a,
            rows: m,
            cols: k,
            rs: ars,
            cs: acs,
        };
        let bm = Mat {
            data: &b,
            rows: k,
            cols: n,
            rs: brs,
            cs: bcs,
        };
        matmul(&mut c, ld, am, bm, accumulate, 1);
        for i in 0..m {
            for j in 0..ld {
                let got = c[i * ld + j];
                if j >= n {
                    assert_eq!(got, before[i * ld + j], "column {j} past n written");
                    continue;
                }
                let mut want: f64 = if accumulate { before[i * ld + j] as f64 } else { 0.0 };
                let mut mag = want.abs();
                for p in 0..k {
                    let t = a[i * ars + p * acs] as f64 * b[p * brs + j * bcs] as f64;
                    want += t;
                    mag += t.abs();
                }
                assert!(
                    (got as f64 - want).abs() <= 1e-6 * mag + 1e-30,
                    "({m},{n},{k}) ta {ta} tb {tb}: c[{i},{j}] = {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn matches_f64_reference_on_edge_shapes() {
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("LOFT_SIMD").is_none() && std::env::var_os("LOFT_GEMM").is_none() {
            // the dispatch follows the CPU
            assert_eq!(available(), std::arch::is_x86_feature_detected!("avx512f"));
        }
        if !available() {
            eprintln!("the AVX-512 kernel is off here (no AVX-512F, or LOFT_GEMM / LOFT_SIMD set): the gemm crate serves these products");
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (16, 1000, 16),
            (24, 17, 33),
            (13, 47, 400),
            (200, 49, 9),
            (32, 16, 3000),
            (7, 1600, 5),
            (97, 1601, 385),
            (5, 9, 2100),
        ] {
            for (ta, tb, acc) in [
                (false, false, false),
                (true, false, true),
                (false, true, false),
                (true, true, true),
            ] {
                check(m, n, k, ta, tb, acc);
            }
        }
    }
}
