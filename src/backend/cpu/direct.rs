//! Direct 3x3 stride-1 pad-1 convolution on AVX-512 CPUs (f32): forward, data and filter
//! gradients as implicit GEMMs read straight from the NCHW tensors, no im2col, no padded
//! copies, no transforms.
//!
//! Each channel plane is cut into vectors of 16 consecutive positions (the last one of a
//! plane partial). For tap (ky, kx) the inputs of a vector's outputs are the 16 floats
//! `(ky - 1) w + (kx - 1)` further on, except where the tap falls outside the map (image
//! border, or a row's end wrapping into the next row): a per-(vector, tap) lane mask zeroes
//! those, and the masked load does not touch their memory. So
//!
//! - forward: `y[co][v] = Σ_{ci, tap} w[co][ci][tap] · load(mask(v, tap), x[ci] + v + shift(tap))`,
//!   register tiles of 8 output channels x 3 vectors (24 zmm accumulators) over blocks of
//!   input channels, stored whole;
//! - data gradient: the forward pass of dy with the filters flipped and their channel axes
//!   swapped (a 3x3 stride-1 pad-1 transposed convolution is that correlation);
//! - filter gradient: `dw[co][ci][tap] = Σ_{images, v} dy[co][v] · load(mask(v, tap), x[ci] + v +
//!   shift(tap))`: dot products, 4 x 6 per register tile, each run over a group of images
//!   before its lanes are reduced.
//!
//! Against Winograd (2.25x fewer multiplications on F(2x2, 3x3)) this wins where Winograd's
//! transforms and their memory traffic dominate: few channels, or small maps
//! ([`super::conv::Algo::for_shape`] decides by shape).
//!
//! Determinism: forward and data-gradient tasks are whole images, each output summed by one
//! task in a fixed order; the filter gradient deals image groups to [`LANES`] fixed partial
//! sums added in order. The bits depend on the shape only, never on the thread count.

use super::sgemm;
use crate::ops::Conv2d;
use rayon::prelude::*;

/// Output channels per register tile.
const MR: usize = 8;
/// Vectors of 16 positions per register tile.
const NV: usize = 3;
/// Input channels per block of the forward's k loop (a block of a filter strip is
/// `9 KB MR` floats, 18 KiB, in L1 with its three vectors' inputs).
const KB: usize = 64;
/// Positions per forward task (about; whole images), and per filter-gradient group.
const TASK_POSITIONS: usize = 1024;
/// Fixed partial sums of the filter gradient (image groups dealt round-robin).
const LANES: usize = 8;

/// Whether this file computes the convolution: 3x3, stride 1, pad 1, on a CPU with the
/// AVX-512 product ([`sgemm::available`]).
pub fn applies(s: &Conv2d) -> bool {
    s.kh == 3 && s.kw == 3 && s.stride == 1 && s.pad == 1 && sgemm::available()
}

/// The vectors of one `(h, w)` plane and their tap masks.
struct Plane {
    hw: usize,
    /// Vectors per plane, `ceil(hw / 16)`.
    vectors: usize,
    /// Per tap, the offset of its input from the output position, `(ky - 1) w + kx - 1`.
    shift: [isize; 9],
    /// Per vector and tap, the lanes whose tap input lies inside the map.
    mask: Vec<[u16; 9]>,
    /// Per vector, the lanes inside the plane.
    inside: Vec<u16>,
}

impl Plane {
    fn new(h: usize, w: usize) -> Plane {
        let hw = h * w;
        let vectors = hw.div_ceil(16);
        let shift = std::array::from_fn(|t| (t / 3) as isize * w as isize - w as isize + (t % 3) as isize - 1);
        let mut mask = vec![[0u16; 9]; vectors];
        let mut inside = vec![0u16; vectors];
        for (v, (m, ins)) in mask.iter_mut().zip(&mut inside).enumerate() {
            for l in 0..16 {
                let p = 16 * v + l;
                if p >= hw {
                    break;
                }
                *ins |= 1 << l;
                let (y, x) = ((p / w) as isize, (p % w) as isize);
                for (t, bits) in m.iter_mut().enumerate() {
                    let (iy, ix) = (y + (t / 3) as isize - 1, x + (t % 3) as isize - 1);
                    if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                        *bits |= 1 << l;
                    }
                }
            }
        }
        Plane {
            hw,
            vectors,
            shift,
            mask,
            inside,
        }
    }
}

/// Filters `f(row, channel, tap)` of a `(m, c, 3, 3)` convolution packed in strips of [`MR`]
/// rows: `a[(s 9c + p) MR + i] = f(s MR + i, p / 9, p % 9)`, zero for rows past m.
fn pack_filters(m: usize, c: usize, f: impl Fn(usize, usize, usize) -> f32) -> Vec<f32> {
    let k = 9 * c;
    let strips = m.div_ceil(MR);
    let mut a = vec![0.0f32; strips * k * MR];
    for s in 0..strips {
        for p in 0..k {
            for i in 0..MR.min(m - s * MR) {
                a[(s * k + p) * MR + i] = f(s * MR + i, p / 9, p % 9);
            }
        }
    }
    a
}

/// Forward: `y (n, c_out, h, w) = conv3x3(x (n, c_in, h, w), w (c_out, c_in, 3, 3))`.
pub fn forward(s: &Conv2d, x: &[f32], w: &[f32], y: &mut [f32]) {
    debug_assert!(applies(s));
    let a = pack_filters(s.c_out, s.c_in, |co, ci, t| w[(co * s.c_in + ci) * 9 + t]);
    convolve(s, x, &a, y, false);
}

/// Data gradient: `dx (+)= conv_transpose(dy, w)`, the forward pass of dy with the filters
/// flipped and their channel axes swapped.
pub fn backward_data(s: &Conv2d, dy: &[f32], w: &[f32], dx: &mut [f32], accumulate: bool) {
    debug_assert!(applies(s));
    let t = Conv2d {
        c_in: s.c_out,
        c_out: s.c_in,
        ..*s
    };
    let a = pack_filters(s.c_in, s.c_out, |ci, co, tap| w[(co * s.c_in + ci) * 9 + 8 - tap]);
    convolve(&t, dy, &a, dx, accumulate);
}

/// Images per task or group: about [`TASK_POSITIONS`] positions, at least one image.
fn images_per(hw: usize) -> usize {
    (TASK_POSITIONS / hw.max(1)).max(1)
}

/// `y (+)= ` the convolution of x with the packed filters `a` (see [`pack_filters`]), one
/// task per group of whole images.
fn convolve(s: &Conv2d, x: &[f32], a: &[f32], y: &mut [f32], accumulate: bool) {
    let plane = Plane::new(s.h, s.w);
    let (img_in, img_out) = (s.c_in * plane.hw, s.c_out * plane.hw);
    let per = images_per(plane.hw);
    y[..s.n * img_out]
        .par_chunks_mut(per * img_out)
        .zip(x[..s.n * img_in].par_chunks(per * img_in))
        .for_each(|(yg, xg)| {
            // SAFETY: AVX-512F is present (applies); xg and yg hold the same whole images of
            // x and y, a the packed strips of c_out rows and 9 c_in columns.
            unsafe { group_forward(&plane, s.c_in, s.c_out, a, xg, yg, accumulate) };
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
    let k = 9 * c_in;
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
                x.as_ptr().wrapping_add((b * c_in + c0) * pl.hw + 16 * v)
            });
            let masks: [&[u16; 9]; NV] = std::array::from_fn(|j| &pl.mask[vec_of(j).1]);
            let stores: [u16; NV] = std::array::from_fn(|j| if g0 + j < total { pl.inside[vec_of(j).1] } else { 0 });
            for (si, strip) in a.chunks_exact(k * MR).enumerate() {
                let rows = MR.min(c_out - si * MR);
                let ys: [*mut f32; NV] = std::array::from_fn(|j| {
                    let (b, v) = vec_of(j);
                    y.as_mut_ptr().wrapping_add((b * c_out + si * MR) * pl.hw + 16 * v)
                });
                let tile = Tile {
                    a: strip[9 * c0 * MR..].as_ptr(),
                    xs,
                    masks,
                    ys,
                    stores,
                    rows,
                };
                // SAFETY: the masked lanes of every load lie in plane c0 + c < c_in of the
                // vector's image; the stored lanes are positions of rows < c_out of it.
                unsafe { tile_forward(kc, pl, &tile, load) };
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
    /// The filter strip from the block's first channel: `a[(9 c + tap) MR + i]`.
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

/// `y (load ? += : =) Σ_{c < kc, tap} a · x` for one register tile.
///
/// # Safety
/// AVX-512F; the tile's pointers as [`group_forward`] sets them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_forward(kc: usize, pl: &Plane, t: &Tile, load: bool) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let hw = pl.hw;
    for c in 0..kc {
        for tap in 0..9 {
            let shift = pl.shift[tap] + (c * hw) as isize;
            // SAFETY: the masked lanes are inside plane c of the vector's image (the masks
            // drop every tap input outside the map); the strip holds 9 kc MR floats.
            unsafe {
                let bv: [__m512; NV] = [
                    _mm512_maskz_loadu_ps(t.masks[0][tap], t.xs[0].wrapping_offset(shift)),
                    _mm512_maskz_loadu_ps(t.masks[1][tap], t.xs[1].wrapping_offset(shift)),
                    _mm512_maskz_loadu_ps(t.masks[2][tap], t.xs[2].wrapping_offset(shift)),
                ];
                let ap = t.a.add((9 * c + tap) * MR);
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(i));
                    for v in 0..NV {
                        row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
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

/// Filter gradient: `dw (c_out, c_in, 3, 3) (+)= Σ_batch` of the correlation of x with dy.
/// Groups of whole images (about [`TASK_POSITIONS`] positions) are dealt to [`LANES`]
/// partial sums (group g to lane g mod LANES), each summed in order; the partials are added
/// in lane order.
pub fn backward_filter(s: &Conv2d, x: &[f32], dy: &[f32], dw: &mut [f32], accumulate: bool) {
    debug_assert!(applies(s));
    let plane = Plane::new(s.h, s.w);
    let k = 9 * s.c_in;
    let wl = s.c_out * k;
    let per = images_per(plane.hw);
    let groups = s.n.div_ceil(per);
    let mut partials = vec![0.0f32; LANES * wl];
    partials.par_chunks_mut(wl).enumerate().for_each(|(lane, part)| {
        for gi in (lane..groups).step_by(LANES) {
            let b0 = gi * per;
            let nb = per.min(s.n - b0);
            let xg = &x[b0 * s.c_in * plane.hw..][..nb * s.c_in * plane.hw];
            let gg = &dy[b0 * s.c_out * plane.hw..][..nb * s.c_out * plane.hw];
            // SAFETY: AVX-512F is present (applies); xg and gg hold the group's nb images
            // of x and dy, part c_out x 9 c_in floats.
            unsafe { dot_group(&plane, s.c_in, s.c_out, nb, gg, xg, part) };
        }
    });
    let (first, rest) = partials.split_at_mut(wl);
    for part in rest.chunks_exact(wl) {
        for (d, &v) in first.iter_mut().zip(part) {
            *d += v;
        }
    }
    for (d, &v) in dw[..wl].iter_mut().zip(first.iter()) {
        *d = if accumulate { *d + v } else { v };
    }
}

/// Rows and columns of the filter gradient's register tile (24 accumulators).
const TR: usize = 4;
const TC: usize = 6;

/// `part (c_out, 9 c_in) += Σ_{images, vectors} dy · x(tap)` for one group of `nb` images.
///
/// # Safety
/// AVX-512F; `g` holds `nb c_out hw` floats, `x` `nb c_in hw`, `part` `c_out 9 c_in`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_group(pl: &Plane, c_in: usize, c_out: usize, nb: usize, g: &[f32], x: &[f32], part: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = 9 * c_in;
    let hw = pl.hw;
    for j0 in (0..k).step_by(TC) {
        let cols = TC.min(k - j0);
        // columns past the edge repeat the last one; they are not stored
        let col = |c: usize| j0 + c.min(cols - 1);
        let taps: [usize; TC] = std::array::from_fn(|c| col(c) % 9);
        let xoff: [isize; TC] = std::array::from_fn(|c| ((col(c) / 9) * hw) as isize + pl.shift[taps[c]]);
        for i0 in (0..c_out).step_by(TR) {
            let rows = TR.min(c_out - i0);
            let mut acc = [[_mm512_setzero_ps(); TC]; TR];
            for b in 0..nb {
                let xi = x.as_ptr().wrapping_add(b * c_in * hw);
                let gi = g.as_ptr().wrapping_add((b * c_out + i0) * hw);
                let row = |r: usize| gi.wrapping_add(r.min(rows - 1) * hw);
                for (v, (masks, &inside)) in pl.mask.iter().zip(&pl.inside).enumerate() {
                    let p = 16 * v;
                    // SAFETY: the loaded lanes are positions of the image's planes (inside
                    // for dy, the tap masks for x, which drop inputs outside the map).
                    unsafe {
                        let av: [__m512; TR] = [
                            _mm512_maskz_loadu_ps(inside, row(0).add(p)),
                            _mm512_maskz_loadu_ps(inside, row(1).add(p)),
                            _mm512_maskz_loadu_ps(inside, row(2).add(p)),
                            _mm512_maskz_loadu_ps(inside, row(3).add(p)),
                        ];
                        for c in 0..TC {
                            let bv = _mm512_maskz_loadu_ps(masks[taps[c]], xi.wrapping_offset(xoff[c] + p as isize));
                            for r in 0..TR {
                                acc[r][c] = _mm512_fmadd_ps(av[r], bv, acc[r][c]);
                            }
                        }
                    }
                }
            }
            let [r0, r1, r2, r3] = &acc;
            let columns = r0.iter().zip(r1).zip(r2).zip(r3);
            for (c, (((&v0, &v1), &v2), &v3)) in columns.enumerate().take(cols) {
                let mut sums = [0.0f32; TR];
                // SAFETY: sums holds the 4 floats of one __m128.
                unsafe { _mm_storeu_ps(sums.as_mut_ptr(), sgemm::sum4(v0, v1, v2, v3)) };
                for (r, &sum) in sums.iter().enumerate().take(rows) {
                    part[(i0 + r) * k + j0 + c] += sum;
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_group(_: &Plane, _: usize, _: usize, _: usize, _: &[f32], _: &[f32], _: &mut [f32]) {
    unreachable!("direct convolution: AVX-512 only")
}
