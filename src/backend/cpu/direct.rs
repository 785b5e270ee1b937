//! Direct 3x3 pad-1 convolution on AVX-512 CPUs (f32): forward, data and filter gradients of
//! stride-1 layers and of stride-2 ones on even maps, as implicit GEMMs over the NCHW
//! tensors: no im2col, no transforms.
//!
//! Each channel plane is cut into vectors of 16 consecutive positions (the last one of a
//! plane partial). For tap (ky, kx) the inputs of a vector's outputs are the 16 floats
//! `(ky - 1) w + (kx - 1)` further on, except where the tap falls outside the map (image
//! border, or a row's end wrapping into the next row): a per-(vector, tap) lane mask drops
//! those, on the multiply-adds (the load reads all 16 floats) or, for the tiles whose loads
//! could reach past the tensor's ends, on the loads. So
//!
//! - forward: `y[co][v] = Σ_{ci, tap} mask(v, tap) · w[co][ci][tap] · x[ci][v + shift(tap)]`,
//!   register tiles of 8 output channels x 3 vectors (24 zmm accumulators) over blocks of
//!   input channels, stored whole;
//! - data gradient: the forward pass of dy with the filters flipped and their channel axes
//!   swapped (a 3x3 stride-1 pad-1 transposed convolution is that correlation);
//! - stride 2: the forward reads a copy of the input split into four phase planes (even and
//!   odd rows and columns), where every tap is again a stride-1 read (`Plane::fill`); the
//!   data gradient computes dx one phase at a time, each phase a stride-1 read of dy with
//!   1, 2, 2 or 4 of the taps (`backward_data_s2`);
//! - filter gradient: outer products over images laid side by side with zero columns between
//!   them (see [`backward_filter`]): per position, the 9 taps of an input channel broadcast
//!   against one or two vectors of output channels of dy transposed, `(w + 1) / w` of the
//!   work.
//!
//! Against Winograd (2.25x fewer multiplications on F(2x2, 3x3)) this wins where Winograd's
//! transforms and their memory traffic dominate: few channels, or small maps
//! ([`super::conv::Algo`] decides per pass by shape).
//!
//! Determinism: forward and data-gradient tasks are whole images, each output summed by one
//! task in a fixed order; the filter gradient cuts the batch into `LANES` fixed runs of
//! images, one partial sum each, added in order. The bits depend on the shape only, never
//! on the thread count.

use super::scratch::{floats, Line};
use super::sgemm;
use crate::ops::Conv2d;
use rayon::prelude::*;
use std::cell::RefCell;
use std::thread::LocalKey;

/// Output channels per register tile.
const MR: usize = 8;
/// Vectors of 16 positions per register tile.
const NV: usize = 3;
/// Input channels per block of the forward's k loop (a block of a filter strip is
/// `9 KB MR` floats, 18 KiB, in L1 with its three vectors' inputs).
const KB: usize = 64;
/// Positions per forward task (about; whole images).
const TASK_POSITIONS: usize = 1024;
/// Fixed partial sums of the filter gradient (equal runs of images).
const LANES: usize = 8;

/// Whether this file computes the convolution (all three passes): 3x3, pad 1, on a CPU with
/// the AVX-512 product ([`sgemm::available`]); stride 1, or stride 2 on a map of even sides
/// (its input split into four phase planes for the forward pass and the filter gradient,
/// see `Plane::fill` and `tap_read`; its data gradient one phase of dx at a time, see
/// [`backward_data`]).
pub fn applies(s: &Conv2d) -> bool {
    let even = s.stride == 1 || (s.stride == 2 && s.h.is_multiple_of(2) && s.w.is_multiple_of(2));
    s.kh == 3 && s.kw == 3 && s.pad == 1 && even && sgemm::available()
}

/// The vectors of one output plane and their tap masks.
#[derive(Default)]
struct Plane {
    /// Output positions per plane.
    hw: usize,
    /// Floats per input channel as the kernel reads it (`h w`).
    in_hw: usize,
    /// Vectors per plane, `ceil(hw / 16)`.
    vectors: usize,
    /// Taps in use (9, or 1-4 for a phase of the stride-2 data gradient): the first `taps`
    /// entries of `shift` and of each `mask`.
    taps: usize,
    /// Per tap, the offset of its input from the output position.
    shift: [isize; 9],
    /// Per vector and tap, the lanes whose tap input lies inside the map.
    mask: Vec<[u16; 9]>,
    /// Per vector, the lanes inside the plane.
    inside: Vec<u16>,
}

impl Plane {
    /// Stride 1: tap (ky, kx) reads the input `(ky - 1, kx - 1)` from the output position.
    /// Stride 2 reads a copy of the input split into four phase planes of `(h/2, w/2)`
    /// (even rows and columns, even rows and odd columns, ...; [`split_phases`]): tap
    /// (ky, kx) reads phase plane `((ky + 1) % 2, (kx + 1) % 2)` at `(-1 if ky = 0 else 0,
    /// -1 if kx = 0 else 0)` from the output position, so both strides are stride-1 reads.
    fn fill(&mut self, s: &Conv2d) {
        let (ho, wo) = (s.h_out(), s.w_out());
        let hw = ho * wo;
        // per tap: (row, column) displacement and the phase plane's offset
        let step = |k: usize| -> (isize, usize) {
            if s.stride == 1 {
                (k as isize - 1, 0)
            } else {
                (if k == 0 { -1 } else { 0 }, (k + 1) % 2)
            }
        };
        let taps: [(isize, isize, usize); 9] = std::array::from_fn(|t| {
            let ((dy, py), (dx, px)) = (step(t / 3), step(t % 3));
            (dy, dx, (2 * py + px) * hw)
        });
        self.fill_taps(ho, wo, &taps, s.h * s.w);
    }

    /// The tables for outputs of `(ho, wo)` reading, per tap, the input displaced by
    /// `(dy, dx)` rows and columns in the plane `base` floats on (bounds checked against
    /// `(ho, wo)`), with `in_hw` floats per input channel.
    fn fill_taps(&mut self, ho: usize, wo: usize, taps: &[(isize, isize, usize)], in_hw: usize) {
        let hw = ho * wo;
        let vectors = hw.div_ceil(16);
        let tap = |t: usize| taps[t];
        let shift = std::array::from_fn(|t| {
            taps.get(t)
                .map_or(0, |&(dy, dx, base)| base as isize + dy * wo as isize + dx)
        });
        // the tables are reused between calls (no allocation once grown)
        let (mask, inside) = (&mut self.mask, &mut self.inside);
        mask.clear();
        mask.resize(vectors, [0; 9]);
        inside.clear();
        inside.resize(vectors, 0);
        for (v, (m, ins)) in mask.iter_mut().zip(inside.iter_mut()).enumerate() {
            for l in 0..16 {
                let p = 16 * v + l;
                if p >= hw {
                    break;
                }
                *ins |= 1 << l;
                let (y, x) = ((p / wo) as isize, (p % wo) as isize);
                for (t, bits) in m.iter_mut().enumerate().take(taps.len()) {
                    let (dy, dx, _) = tap(t);
                    let (iy, ix) = (y + dy, x + dx);
                    if iy >= 0 && iy < ho as isize && ix >= 0 && ix < wo as isize {
                        *bits |= 1 << l;
                    }
                }
            }
        }
        self.hw = hw;
        self.in_hw = in_hw;
        self.vectors = vectors;
        self.taps = taps.len();
        self.shift = shift;
    }
}

/// `dst (c, 4, h/2, w/2)`: the planes of `x (c, h, w)` split by row and column parity,
/// phase `2 (row % 2) + column % 2`.
fn split_phases(x: &[f32], c: usize, h: usize, w: usize, dst: &mut [f32]) {
    let (ho, wo) = (h / 2, w / 2);
    for ch in 0..c {
        let src = &x[ch * h * w..][..h * w];
        let out = &mut dst[ch * h * w..][..h * w];
        for (y, row) in src.chunks_exact(w).enumerate() {
            let (i, py) = (y / 2, y % 2);
            for (b, phase) in out[2 * py * ho * wo..][..2 * ho * wo]
                .chunks_exact_mut(ho * wo)
                .enumerate()
            {
                for (j, d) in phase[i * wo..][..wo].iter_mut().enumerate() {
                    *d = row[2 * j + b];
                }
            }
        }
    }
}

/// Filters `f(row, channel, tap)` of a `(m, c, taps)` convolution packed in strips of [`MR`]
/// rows after the `a.len()` floats already there: `a[(s taps c + p) MR + i] = f(s MR + i,
/// p / taps, p % taps)`, zero for rows past m.
fn pack_filters(a: &mut Vec<f32>, m: usize, c: usize, taps: usize, f: impl Fn(usize, usize, usize) -> f32 + Sync) {
    let k = taps * c;
    let strips = m.div_ceil(MR);
    let start = a.len();
    a.resize(start + strips * k * MR, 0.0);
    a[start..].par_chunks_mut(k * MR).enumerate().for_each(|(s, strip)| {
        for p in 0..k {
            for i in 0..MR.min(m - s * MR) {
                strip[p * MR + i] = f(s * MR + i, p / taps, p % taps);
            }
        }
    });
}

thread_local! {
    /// This thread's packed filters, output-plane tables, phase-split input (stride-2 forward
    /// tasks), filter-gradient partial sums and per-lane layouts: kept between calls, so a
    /// training step allocates nothing once they have grown.
    static FILTERS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PLANE: RefCell<Plane> = RefCell::new(Plane::default());
    static PHASE_PLANES: RefCell<[Plane; 4]> = RefCell::new(Default::default());
    static PHASES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static LAYOUT: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `f` on this thread's cached `key` (on a fresh value if that one is in use further up
/// this thread's stack, as when a waiting rayon worker runs another task).
fn with_cached<V: Default + 'static, R>(key: &'static LocalKey<RefCell<V>>, f: impl FnOnce(&mut V) -> R) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => f(&mut v),
        Err(_) => f(&mut V::default()),
    })
}

/// Forward: `y (n, c_out, h, w) = conv3x3(x (n, c_in, h, w), w (c_out, c_in, 3, 3))`.
pub fn forward(s: &Conv2d, x: &[f32], w: &[f32], y: &mut [f32]) {
    debug_assert!(applies(s));
    with_cached(&FILTERS, |a| {
        a.clear();
        pack_filters(a, s.c_out, s.c_in, 9, |co, ci, t| w[(co * s.c_in + ci) * 9 + t]);
        convolve(s, x, a, y, false);
    });
}

/// Data gradient: `dx (+)= conv_transpose(dy, w)`. Stride 1: the forward pass of dy with
/// the filters flipped and their channel axes swapped. Stride 2: see `backward_data_s2`.
pub fn backward_data(s: &Conv2d, dy: &[f32], w: &[f32], dx: &mut [f32], accumulate: bool) {
    debug_assert!(applies(s));
    if s.stride == 2 {
        return backward_data_s2(s, dy, w, dx, accumulate);
    }
    let t = Conv2d {
        c_in: s.c_out,
        c_out: s.c_in,
        ..*s
    };
    with_cached(&FILTERS, |a| {
        a.clear();
        pack_filters(a, s.c_in, s.c_out, 9, |ci, co, tap| w[(co * s.c_in + ci) * 9 + 8 - tap]);
        convolve(&t, dy, a, dx, accumulate);
    });
}

/// The kernel rows (or columns) that reach input rows of parity `p` at stride 2, pad 1, with
/// the output row each reads, as a displacement from the input row's half: `p = 0` (input row
/// 2i) is reached by kernel row 1 from output row i; `p = 1` (2i + 1) by kernel row 0 from
/// output row i + 1 and kernel row 2 from output row i.
const fn phase_taps(p: usize) -> &'static [(usize, isize)] {
    if p == 0 {
        &[(1, 0)]
    } else {
        &[(0, 1), (2, 0)]
    }
}

/// Stride-2 data gradient one phase of dx at a time: the inputs at (2i + py, 2j + px) take
/// only the kernel taps of [`phase_taps`] (1, 2, 2 and 4 taps: the 9 of the filter once
/// each), each a stride-1 read of dy displaced by 0 or +1 rows and columns, so each phase is
/// the forward kernel on dy's planes with its own tap table and filters:
/// `dx[ci][2i + py][2j + px] = Σ_{co, (ky, kx)} w[co][ci][ky][kx] dy[co][i + di(ky)][j + dj(kx)]`.
/// Per task (whole images) the four phases go to a phase-split buffer, then into dx.
fn backward_data_s2(s: &Conv2d, dy: &[f32], w: &[f32], dx: &mut [f32], accumulate: bool) {
    let (ho, wo) = (s.h_out(), s.w_out());
    let hw = ho * wo;
    // phase 2 py + px: its taps as (ky, kx, di, dj)
    let phase = |ph: usize| {
        let (rows, cols) = (phase_taps(ph / 2), phase_taps(ph % 2));
        rows.iter()
            .flat_map(move |&(ky, di)| cols.iter().map(move |&(kx, dj)| (ky, kx, di, dj)))
    };
    with_cached(&FILTERS, |a| {
        a.clear();
        // each phase's filters packed after the previous phase's; `starts` says where
        let mut starts = [0; 4];
        for (ph, start) in starts.iter_mut().enumerate() {
            *start = a.len();
            let mut taps = [(0, 0); 4];
            for (slot, (ky, kx, _, _)) in taps.iter_mut().zip(phase(ph)) {
                *slot = (ky, kx);
            }
            pack_filters(a, s.c_in, s.c_out, phase(ph).count(), |ci, co, t| {
                let (ky, kx) = taps[t];
                w[(co * s.c_in + ci) * 9 + 3 * ky + kx]
            });
        }
        let a = &*a;
        with_cached(&PHASE_PLANES, |planes| {
            for (ph, pl) in planes.iter_mut().enumerate() {
                let mut taps = [(0, 0, 0); 4];
                let n = phase(ph).count();
                for (slot, (_, _, di, dj)) in taps.iter_mut().zip(phase(ph)) {
                    *slot = (di, dj, 0);
                }
                pl.fill_taps(ho, wo, &taps[..n], hw);
            }
            let planes = &*planes;
            // floats per image of dy and of dx
            let (dy_img, dx_img) = (s.c_out * hw, s.c_in * s.h * s.w);
            let per = images_per(hw);
            dx[..s.n * dx_img]
                .par_chunks_mut(per * dx_img)
                .zip(dy[..s.n * dy_img].par_chunks(per * dy_img))
                .for_each(|(dxg, dyg)| {
                    let nb = dyg.len() / dy_img;
                    with_cached(&PHASES, |buf| {
                        buf.resize(4 * nb * s.c_in * hw, 0.0);
                        for (ph, out) in buf.chunks_exact_mut(nb * s.c_in * hw).enumerate() {
                            let end = if ph < 3 { starts[ph + 1] } else { a.len() };
                            // SAFETY: AVX-512F is present (applies); dyg holds nb images of
                            // c_out planes of hw, out nb images of c_in planes, and the
                            // phase's filters are c_in rows of c_out taps packed in strips.
                            unsafe {
                                group_forward(&planes[ph], s.c_out, s.c_in, &a[starts[ph]..end], dyg, out, false)
                            };
                        }
                        merge_phases(buf, nb * s.c_in, s.h, s.w, dxg, accumulate);
                    });
                });
        });
    });
}

/// `dst (c, h, w) (+)= ` the planes of `src (4, c, h/2, w/2)` interleaved by row and column
/// parity, phase `2 (row % 2) + column % 2` (the inverse of [`split_phases`], phase-major).
fn merge_phases(src: &[f32], c: usize, h: usize, w: usize, dst: &mut [f32], accumulate: bool) {
    let (ho, wo) = (h / 2, w / 2);
    let phase_len = c * ho * wo;
    for ch in 0..c {
        let out = &mut dst[ch * h * w..][..h * w];
        for (y, row) in out.chunks_exact_mut(w).enumerate() {
            let (i, py) = (y / 2, y % 2);
            for px in 0..2 {
                let from = &src[(2 * py + px) * phase_len + (ch * ho + i) * wo..][..wo];
                for (j, &v) in from.iter().enumerate() {
                    let d = &mut row[2 * j + px];
                    *d = if accumulate { *d + v } else { v };
                }
            }
        }
    }
}

/// Images per task or group: about [`TASK_POSITIONS`] positions, at least one image.
fn images_per(hw: usize) -> usize {
    (TASK_POSITIONS / hw.max(1)).max(1)
}

/// `y (+)= ` the convolution of x with the packed filters `a` (see [`pack_filters`]), one
/// task per group of whole images.
fn convolve(s: &Conv2d, x: &[f32], a: &[f32], y: &mut [f32], accumulate: bool) {
    with_cached(&PLANE, |plane| {
        plane.fill(s);
        let plane = &*plane;
        let (img_in, img_out) = (s.c_in * plane.in_hw, s.c_out * plane.hw);
        let per = images_per(plane.hw);
        y[..s.n * img_out]
            .par_chunks_mut(per * img_out)
            .zip(x[..s.n * img_in].par_chunks(per * img_in))
            .for_each(|(yg, xg)| {
                let nb = xg.len() / (s.c_in * s.h * s.w);
                let mut run = |xg: &[f32]| {
                    // SAFETY: AVX-512F is present (applies_forward); xg and yg hold the same
                    // whole images of x (phase-split for stride 2) and y, a the packed strips
                    // of c_out rows and 9 c_in columns.
                    unsafe { group_forward(plane, s.c_in, s.c_out, a, xg, yg, accumulate) };
                };
                if s.stride == 1 {
                    run(xg);
                } else {
                    with_cached(&PHASES, |buf| {
                        buf.resize(xg.len(), 0.0);
                        split_phases(xg, nb * s.c_in, s.h, s.w, buf);
                        run(buf);
                    });
                }
            });
    });
}

/// One group of images: every register tile of `y (nb, c_out, h, w)`, block of input
/// channels by block.
///
/// # Safety
/// AVX-512F must be present; `x` holds `nb c_in hw` floats and `y` `nb c_out hw`, `a`
/// `ceil(c_out / MR)` strips of `9 c_in MR` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn group_forward(pl: &Plane, c_in: usize, c_out: usize, a: &[f32], x: &[f32], y: &mut [f32], accumulate: bool) {
    let nb = y.len() / (c_out * pl.hw);
    let total = nb * pl.vectors;
    let k = pl.taps * c_in;
    for c0 in (0..c_in).step_by(KB) {
        let kc = KB.min(c_in - c0);
        let load = accumulate || c0 > 0;
        for g0 in (0..total).step_by(NV) {
            // the tile's vectors (past the group's end: the last one again, not stored)
            let vec_of = |j: usize| {
                let g = (g0 + j).min(total - 1);
                (g / pl.vectors, g % pl.vectors)
            };
            let xs: [*const f32; NV] = std::array::from_fn(|j| {
                let (b, v) = vec_of(j);
                x.as_ptr().wrapping_add((b * c_in + c0) * pl.in_hw + 16 * v)
            });
            let masks: [&[u16; 9]; NV] = std::array::from_fn(|j| &pl.mask[vec_of(j).1]);
            // whether every tap's whole 16 floats, for every channel of the block, lie in x
            // (all but the group's first and last tiles): then the loads need no masks
            let offset = |j: usize| {
                let (b, v) = vec_of(j);
                ((b * c_in + c0) * pl.in_hw + 16 * v) as isize
            };
            let used = &pl.shift[..pl.taps];
            let (lo, hi) = (used.iter().min().unwrap_or(&0), used.iter().max().unwrap_or(&0));
            let inside =
                offset(0) + lo >= 0 && offset(NV - 1) + ((kc - 1) * pl.in_hw) as isize + hi + 16 <= x.len() as isize;
            let stores: [u16; NV] = std::array::from_fn(|j| if g0 + j < total { pl.inside[vec_of(j).1] } else { 0 });
            for (si, strip) in a.chunks_exact(k * MR).enumerate() {
                let rows = MR.min(c_out - si * MR);
                let ys: [*mut f32; NV] = std::array::from_fn(|j| {
                    let (b, v) = vec_of(j);
                    y.as_mut_ptr().wrapping_add((b * c_out + si * MR) * pl.hw + 16 * v)
                });
                let tile = Tile {
                    a: strip[pl.taps * c0 * MR..].as_ptr(),
                    xs,
                    masks,
                    ys,
                    stores,
                    rows,
                };
                // SAFETY: the masked lanes of every load lie in plane c0 + c < c_in of the
                // vector's image, and all 16 lanes in x where `inside`; the stored lanes are
                // positions of rows < c_out of it.
                unsafe {
                    if inside {
                        tile_forward::<false>(kc, pl, &tile, load)
                    } else {
                        tile_forward::<true>(kc, pl, &tile, load)
                    }
                };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn group_forward(_: &Plane, _: usize, _: usize, _: &[f32], _: &[f32], _: &mut [f32], _: bool) {
    unreachable!("direct convolution: AVX-512 only")
}

/// The operands of one forward register tile.
struct Tile<'a> {
    /// The filter strip from the block's first channel: `a[(taps c + tap) MR + i]`.
    a: *const f32,
    /// Per vector, its positions in the block's first input plane.
    xs: [*const f32; NV],
    /// Per vector, its tap masks.
    masks: [&'a [u16; 9]; NV],
    /// Per vector, its positions in the strip's first output plane.
    ys: [*mut f32; NV],
    /// Per vector, the lanes stored (0: the vector is past the group and not stored).
    stores: [u16; NV],
    /// Output channels of the strip that exist.
    rows: usize,
}

/// `y (load ? += : =) Σ_{c < kc, tap} a · x` for one register tile. The tap masks apply to
/// the loads where `MASKED_LOADS` (a load may reach past x's ends), else to the
/// multiply-adds: an unmasked load and a masked FMA cost one port-0/5 operation less than a
/// masked load and an FMA (about 8% of the tile's time).
///
/// # Safety
/// AVX-512F; the tile's pointers as [`group_forward`] sets them; without `MASKED_LOADS`,
/// all 16 floats of every tap's load inside x.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_forward<const MASKED_LOADS: bool>(kc: usize, pl: &Plane, t: &Tile, load: bool) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let hw = pl.hw;
    for c in 0..kc {
        for tap in 0..pl.taps {
            let shift = pl.shift[tap] + (c * pl.in_hw) as isize;
            // SAFETY: the masked lanes are inside plane c of the vector's image (the masks
            // drop every tap input outside the map); the strip holds 9 kc MR floats.
            unsafe {
                let ks: [u16; NV] = std::array::from_fn(|v| t.masks[v][tap]);
                let bv: [__m512; NV] = std::array::from_fn(|v| {
                    let p = t.xs[v].wrapping_offset(shift);
                    if MASKED_LOADS {
                        _mm512_maskz_loadu_ps(ks[v], p)
                    } else {
                        _mm512_loadu_ps(p)
                    }
                });
                let ap = t.a.add((pl.taps * c + tap) * MR);
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(i));
                    for v in 0..NV {
                        row[v] = if MASKED_LOADS {
                            _mm512_fmadd_ps(av, bv[v], row[v])
                        } else {
                            _mm512_mask3_fmadd_ps(av, bv[v], row[v], ks[v])
                        };
                    }
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(t.rows) {
        for ((&sum, &mask), &out) in row.iter().zip(&t.stores).zip(&t.ys) {
            if mask == 0 {
                continue;
            }
            // SAFETY: the stored lanes are positions of output row i of the vector's image.
            unsafe {
                let dst = out.add(i * hw);
                let val = if load {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), sum)
                } else {
                    sum
                };
                _mm512_mask_storeu_ps(dst, mask, val);
            }
        }
    }
}

/// Filter gradient: `dw (c_out, c_in, 3, 3) (+)= Σ_batch` of the correlation of x with dy,
/// as outer products. A group of G images (`images_side_by_side`) is laid side by side
/// with one zero column between neighbours and a zero border: planes of `(h + 2) x PW`,
/// `PW = G (w + 1) + 1`; dy is transposed into `(Q, c_out)` rows over the same width
/// (`Q = h PW`, zero at the separating columns). For each position the 9 taps of an input
/// channel are then scalars at fixed offsets and the output channels one or two vectors:
/// `dwᵀ[(ci, tap)][co] += x̃[ci][q + off(tap)] · dyᵀ[q][co]`, `(w + 1) / w` of the work
/// plus a row per group. The batch is cut into `LANES` equal runs of images, one partial
/// sum each (equal work per lane, so threads that take equal numbers of lanes finish
/// together), each run into near-equal groups summed in order; the partials are added in
/// lane order.
pub fn backward_filter(s: &Conv2d, x: &[f32], dy: &[f32], dw: &mut [f32], accumulate: bool) {
    debug_assert!(applies(s));
    let (h, w, ho, wo) = (s.h, s.w, s.h_out(), s.w_out());
    let per = images_side_by_side(wo);
    let cp = s.c_out.next_multiple_of(16);
    let k = 9 * s.c_in;
    let (img_in, img_out) = (s.c_in * h * w, s.c_out * ho * wo);
    // stride 1: one plane of (h + 2) rows per channel; stride 2: four phase planes of
    // (h/2 + 1) rows (a zero row above, a zero column left of each image)
    let (rows, phases) = if s.stride == 1 { (h + 2, 1) } else { (ho + 1, 4) };
    let pw_max = per * (wo + 1) + 1;
    with_cached(&PARTIALS, |partials| {
        if partials.len() < LANES * k * cp {
            partials.resize(LANES * k * cp, 0.0);
        }
        let partials = &mut partials[..LANES * k * cp];
        partials.par_chunks_mut(k * cp).enumerate().for_each(|(lane, part)| {
            part.fill(0.0);
            with_cached(&LAYOUT, |(xbuf, gbuf)| {
                // the last plane's taps read up to 2 floats past it
                xbuf.resize((s.c_in * phases * rows * pw_max + 16).div_ceil(16), Line::default());
                gbuf.resize((ho * pw_max * cp).div_ceil(16), Line::default());
                // the borders and separating columns are zero from the first group of a layout on:
                // later groups of the same size write the same positions
                let mut layout = 0;
                let (lo, hi) = (lane * s.n / LANES, (lane + 1) * s.n / LANES);
                let groups = (hi - lo).div_ceil(per);
                for gi in 0..groups {
                    // near-equal groups: the first (hi - lo) % groups take one image more
                    let (base, extra) = ((hi - lo) / groups, (hi - lo) % groups);
                    let b0 = lo + gi * base + gi.min(extra);
                    let nb = base + usize::from(gi < extra);
                    let pw = nb * (wo + 1) + 1;
                    let geo = Outer {
                        pw,
                        pp: rows * pw,
                        q: ho * pw,
                        cp,
                    };
                    if nb != layout {
                        floats(xbuf).fill(0.0);
                        floats(gbuf).fill(0.0);
                        layout = nb;
                    }
                    let xp = floats(xbuf);
                    let plane = phases * geo.pp;
                    for i in 0..nb {
                        let xi = &x[(b0 + i) * img_in..][..img_in];
                        let left = i * (wo + 1) + 1;
                        for ci in 0..s.c_in {
                            for (y, src) in xi[ci * h * w..][..h * w].chunks_exact(w).enumerate() {
                                if s.stride == 1 {
                                    xp[ci * plane + (y + 1) * pw + left..][..w].copy_from_slice(src);
                                } else {
                                    let at = ci * plane + (y % 2) * 2 * geo.pp + (y / 2 + 1) * pw + left;
                                    for (j, pair) in src.chunks_exact(2).enumerate() {
                                        xp[at + j] = pair[0];
                                        xp[at + geo.pp + j] = pair[1];
                                    }
                                }
                            }
                        }
                    }
                    let gt = floats(gbuf);
                    for i in 0..nb {
                        let gi = &dy[(b0 + i) * img_out..][..img_out];
                        for y in 0..ho {
                            let at = (y * pw + i * (wo + 1)) * cp;
                            // SAFETY: AVX-512F is present (applies); gi holds c_out planes of
                            // (ho, wo), gt from `at` wo rows of cp >= c_out floats.
                            unsafe { transpose_row(gi, s.c_out, ho * wo, y * wo, wo, &mut gt[at..][..wo * cp], cp) };
                        }
                    }
                    // SAFETY: AVX-512F is present (applies_forward); xp holds c_in planes laid out
                    // as geo says and their slack, gt Q rows of cp floats (64-byte aligned, cp a
                    // multiple of 16), part k rows of cp floats.
                    unsafe {
                        if s.stride == 1 {
                            outer_image::<1>(s.c_in, &geo, xp, gt, part)
                        } else {
                            outer_image::<2>(s.c_in, &geo, xp, gt, part)
                        }
                    };
                }
            })
        });
        // the lanes added in order into the first, then transposed into dw: both in
        // parallel (by blocks of rows, then by output channel)
        let (first, rest) = partials.split_at_mut(k * cp);
        let rest: &[f32] = rest;
        first.par_chunks_mut(64 * cp).enumerate().for_each(|(b, block)| {
            let at = b * 64 * cp;
            for part in rest.chunks_exact(k * cp) {
                for (d, &v) in block.iter_mut().zip(&part[at..]) {
                    *d += v;
                }
            }
        });
        let first: &[f32] = first;
        dw[..s.c_out * k].par_chunks_mut(k).enumerate().for_each(|(co, row)| {
            for (p, d) in row.iter_mut().enumerate() {
                let v = first[p * cp + co];
                *d = if accumulate { *d + v } else { v };
            }
        });
    });
}

/// `dst[xx cp + co] = src[co plane + start + xx]` for `co < c`, `xx < len`: one row of
/// every plane of dy, transposed to positions x channels, by 16 x 16 blocks in registers.
///
/// # Safety
/// AVX-512F; `src` holds `c` planes of `plane` floats with `start + len <= plane`; `dst`
/// holds `len` rows of `cp >= c` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_row(src: &[f32], c: usize, plane: usize, start: usize, len: usize, dst: &mut [f32], cp: usize) {
    use std::arch::x86_64::*;
    assert!(c * plane <= src.len() && start + len <= plane && len * cp <= dst.len() && c <= cp);
    for x0 in (0..len).step_by(16) {
        let n = 16.min(len - x0);
        let load_mask: u16 = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
        for c0 in (0..c).step_by(16) {
            let m = 16.min(c - c0);
            // SAFETY: row c0 + r < c of src, lanes x0 .. x0 + n of it (masked); the stores
            // write rows x0 + j < len of dst, lanes c0 .. c0 + m <= c of them (masked).
            unsafe {
                let mut r: [__m512; 16] = std::array::from_fn(|j| {
                    if j < m {
                        _mm512_maskz_loadu_ps(load_mask, src.as_ptr().add((c0 + j) * plane + start + x0))
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                transpose16(&mut r);
                let store_mask: u16 = if m == 16 { u16::MAX } else { (1u16 << m) - 1 };
                for (j, v) in r.iter().enumerate().take(n) {
                    _mm512_mask_storeu_ps(dst.as_mut_ptr().add((x0 + j) * cp + c0), store_mask, *v);
                }
            }
        }
    }
}

/// Transpose the 16 x 16 floats of `r` (row j = vector j) in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: &mut [std::arch::x86_64::__m512; 16]) {
    use std::arch::x86_64::*;
    // within each 128-bit block: rows interleaved by pairs of 32-bit lanes, then 64-bit
    // pairs (vector 4i + j: column j of rows 4i .. 4i + 4, per block); then the blocks
    // gathered across vectors 4 and 8 apart (columns j, 4 + j, 8 + j, 12 + j of 16 rows)
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        for k in 0..2 {
            let (a, b) = (t[4 * i + k], t[4 * i + 2 + k]);
            r[4 * i + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
            r[4 * i + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
        }
    }
    for i in 0..2 {
        for k in 0..4 {
            let (a, b) = (r[8 * i + k], r[8 * i + 4 + k]);
            t[8 * i + k] = _mm512_shuffle_f32x4::<0x88>(a, b);
            t[8 * i + 4 + k] = _mm512_shuffle_f32x4::<0xdd>(a, b);
        }
    }
    for k in 0..8 {
        let (a, b) = (t[k], t[8 + k]);
        r[k] = _mm512_shuffle_f32x4::<0x88>(a, b);
        r[8 + k] = _mm512_shuffle_f32x4::<0xdd>(a, b);
    }
}

/// Images side by side per filter-gradient group: about 64 columns in all (32x32 maps one
/// image, 16x16 three, 8x8 seven, 4x4 twelve). Depends on the shape only.
fn images_side_by_side(w: usize) -> usize {
    (64 / (w + 1)).max(1)
}

/// One group's outer products: `part[(9 ci + tap) cp + co] += Σ_q x̃[ci][tap][q]
/// gt[q cp + co]`, output channels by blocks of 32; a last block of 16 takes two input
/// channels per tile at stride 1 (six row pointers, as one channel does at stride 2).
///
/// # Safety
/// AVX-512F; `xp` holds `c_in` planes as `g` lays them out and 16 floats more, `gt` `q cp`
/// floats from a 64-byte boundary, `part` `9 c_in cp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn outer_image<const S: usize>(c_in: usize, g: &Outer, xp: &[f32], gt: &[f32], part: &mut [f32]) {
    let plane = if S == 1 { g.pp } else { 4 * g.pp };
    let x = |ci: usize| xp.as_ptr().wrapping_add(ci * plane);
    let cp = g.cp;
    let mut co0 = 0;
    // SAFETY: every tile reads channels ci < c_in and columns co0.. < cp, inside the
    // operands as the caller guarantees.
    unsafe {
        while co0 + 32 <= cp {
            for ci in 0..c_in {
                outer_tile::<1, 2, S>(
                    g,
                    [x(ci)],
                    gt.as_ptr().add(co0),
                    part.as_mut_ptr().add(9 * ci * cp + co0),
                );
            }
            co0 += 32;
        }
        if co0 < cp {
            let mut ci = 0;
            while S == 1 && ci + 2 <= c_in {
                outer_tile::<2, 1, S>(
                    g,
                    [x(ci), x(ci + 1)],
                    gt.as_ptr().add(co0),
                    part.as_mut_ptr().add(9 * ci * cp + co0),
                );
                ci += 2;
            }
            for ci in ci..c_in {
                outer_tile::<1, 1, S>(
                    g,
                    [x(ci)],
                    gt.as_ptr().add(co0),
                    part.as_mut_ptr().add(9 * ci * cp + co0),
                );
            }
        }
    }
}

/// The side-by-side layout of a filter-gradient group.
struct Outer {
    /// Row length: the images' columns, one zero column between and around them.
    pw: usize,
    /// Floats per (phase) plane.
    pp: usize,
    /// Output positions, output rows times `pw`.
    q: usize,
    /// Row length of the transposed dy (output channels rounded up to 16).
    cp: usize,
}

/// Where stride `S`'s tap t reads from the output position: (phase plane, row, column).
/// Stride 1: row ky, column kx of the zero-bordered plane. Stride 2: phase
/// `2 ((ky + 1) % 2) + (kx + 1) % 2`, one row (column) down unless ky (kx) is 0, the zero
/// row and column of each phase plane standing for the input above and left of the map.
#[inline(always)]
const fn tap_read<const S: usize>(t: usize) -> (usize, usize, usize) {
    let (ky, kx) = (t / 3, t % 3);
    if S == 1 {
        (0, ky, kx)
    } else {
        (2 * ((ky + 1) % 2) + (kx + 1) % 2, (ky > 0) as usize, (kx > 0) as usize)
    }
}

/// `out[(9 c + tap) cp + 16 v] += Σ_q x̃[c][tap][q] · gt[q cp + 16 v]` for CI input channels
/// and NV vectors of output channels: `9 CI NV` accumulators.
///
/// # Safety
/// AVX-512F; each `xs[c]` is a channel's planes laid out as `g` says with 2 readable floats
/// past them, `gt` `q` rows `cp` apart of `16 NV` floats from a 64-byte boundary, `out` `9
/// CI` rows `cp` apart of `16 NV` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn outer_tile<const CI: usize, const NV: usize, const S: usize>(
    g: &Outer,
    xs: [*const f32; CI],
    gt: *const f32,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut acc = [[[_mm512_setzero_ps(); NV]; 9]; CI];
    let mut e0 = 0;
    if S == 1 {
        // U positions per step: per channel and kernel row, the U + 2 inputs x̃[ky][e + j]
        // serve the three taps of all U positions (U + 2 broadcasts instead of 3 U; U = 3
        // measured best of 2, 3, 4); each accumulator still sums its positions in order, so
        // the bits are those of one position per step
        const U: usize = 3;
        while e0 + U <= g.q {
            // SAFETY: rows e0 .. e0 + U < q of gt; every read of x̃ lies inside the
            // channel's plane (+2).
            unsafe {
                let dv: [[__m512; NV]; U] =
                    std::array::from_fn(|u| std::array::from_fn(|v| _mm512_load_ps(gt.add((e0 + u) * g.cp + 16 * v))));
                for (c, taps) in acc.iter_mut().enumerate() {
                    for ky in 0..3 {
                        let row = xs[c].add(ky * g.pw + e0);
                        let bx: [__m512; U + 2] = std::array::from_fn(|j| _mm512_set1_ps(*row.add(j)));
                        for (u, d) in dv.iter().enumerate() {
                            for kx in 0..3 {
                                for (v, sum) in taps[3 * ky + kx].iter_mut().enumerate() {
                                    *sum = _mm512_fmadd_ps(bx[u + kx], d[v], *sum);
                                }
                            }
                        }
                    }
                }
            }
            e0 += U;
        }
    }
    for e in e0..g.q {
        // SAFETY: row e < q of gt; every tap's read lies inside the channel's planes (+2).
        unsafe {
            let row = gt.add(e * g.cp);
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, b) in bv.iter_mut().enumerate() {
                *b = _mm512_load_ps(row.add(16 * v));
            }
            for (c, taps) in acc.iter_mut().enumerate() {
                for (t, tap) in taps.iter_mut().enumerate() {
                    let (phase, r, col) = tap_read::<S>(t);
                    let a = _mm512_set1_ps(*xs[c].add(phase * g.pp + r * g.pw + col + e));
                    for (v, sum) in tap.iter_mut().enumerate() {
                        *sum = _mm512_fmadd_ps(a, bv[v], *sum);
                    }
                }
            }
        }
    }
    for (c, taps) in acc.iter().enumerate() {
        for (t, tap) in taps.iter().enumerate() {
            for (v, &sum) in tap.iter().enumerate() {
                // SAFETY: row 9 c + t, vector v of out (caller's contract).
                unsafe {
                    let dst = out.add((9 * c + t) * g.cp + 16 * v);
                    _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), sum));
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn outer_image<const S: usize>(_: usize, _: &Outer, _: &[f32], _: &[f32], _: &mut [f32]) {
    unreachable!("direct convolution: AVX-512 only")
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The register transpose against the scalar one, on row lengths and channel counts
    /// around the 16 x 16 blocks.
    #[test]
    fn transpose_row_matches_the_scalar_transpose() {
        if !sgemm::available() {
            return;
        }
        for (c, plane, start, len) in [
            (16usize, 256, 16, 16),
            (5, 40, 3, 33),
            (37, 64, 0, 64),
            (32, 16, 12, 4),
            (1, 1, 0, 1),
        ] {
            let cp = c.next_multiple_of(16);
            let src: Vec<f32> = (0..c * plane).map(|i| i as f32).collect();
            let mut got = vec![-1.0; len * cp];
            // SAFETY: AVX-512F checked above; the sizes as the function requires.
            unsafe { transpose_row(&src, c, plane, start, len, &mut got, cp) };
            for xx in 0..len {
                for co in 0..cp {
                    let want = if co < c { src[co * plane + start + xx] } else { -1.0 };
                    assert_eq!(got[xx * cp + co], want, "c {c} len {len}: position {xx} channel {co}");
                }
            }
        }
    }
}
