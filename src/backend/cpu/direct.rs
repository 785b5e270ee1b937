//! Direct 3x3 stride-1 pad-1 convolution on AVX-512 CPUs (f32): forward, data and filter
//! gradients as implicit GEMMs over a zero-padded copy of each image, no im2col and no
//! transforms.
//!
//! Each image's input is copied into planes of `(h + 2) x (w + 2)` with a zero border. An
//! output position (oy, ox) is indexed in the padded width, `q = oy (w + 2) + ox`; its input
//! for tap (ky, kx) of channel ci then sits at `ci plane + ky (w + 2) + kx + q`, so for a
//! run of consecutive q every tap reads consecutive floats. The forward pass is
//! `Y (c_out, Q) = W (c_out, 9 c_in) · X̃ (9 c_in, Q)`, `Q = h (w + 2)`, where row p of X̃ is
//! the padded input read from offset `off(p)`: a GEMM whose B rows are found through an
//! offset table instead of a stride. The register tile is 8 output channels x 48 positions
//! (24 zmm accumulators, the whole k per tile); its stores drop the two padding columns of
//! each row with compress-stores, so Y is written in place in `(c_out, h, w)`. The cost of
//! the padded width is `(w + 2) / w` more arithmetic: 6% at 32x32, 12% at 16x16.
//!
//! - data gradient: the forward pass of dy with the filters flipped and their channel axes
//!   swapped (a 3x3 stride-1 pad-1 transposed convolution is that correlation);
//! - filter gradient: `dW (c_out, 9 c_in) = Σ_images Ỹ (c_out, Q) · X̃ᵀ`, with Ỹ dy in the
//!   padded width (zeros in the two padding columns): dot products of contiguous runs, 4 x 6
//!   per register tile.
//!
//! Against Winograd (which does 2.25x fewer multiplications) this wins where Winograd's
//! transforms and their memory traffic dominate: few channels on large maps
//! ([`super::conv::Algo::for_shape`] decides by shape).
//!
//! Determinism: forward and data-gradient tasks are whole images, each output summed by one
//! task in a fixed order; the filter gradient deals images to [`LANES`] fixed partial sums
//! added in order. The bits depend on the shape only, never on the thread count.

use super::sgemm::{self, aligned, Line};
use crate::ops::Conv2d;
use rayon::prelude::*;
use std::cell::RefCell;

/// Output channels per register tile.
const MR: usize = 8;
/// Vectors of 16 positions per register tile.
const NV: usize = 3;
/// Positions per register tile.
const NR: usize = 16 * NV;
/// Fixed partial sums of the filter gradient (images dealt round-robin).
const LANES: usize = 8;

/// Whether this file computes the convolution: 3x3, stride 1, pad 1, on a CPU with the
/// AVX-512 product ([`sgemm::available`]).
pub fn applies(s: &Conv2d) -> bool {
    s.kh == 3 && s.kw == 3 && s.stride == 1 && s.pad == 1 && sgemm::available()
}

/// The padded-width geometry of one `(h, w)` map.
#[derive(Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    /// Padded row length, `w + 2`.
    pw: usize,
    /// Floats per padded channel plane, `(h + 2)(w + 2)`.
    plane: usize,
    /// Output positions in the padded width, `h (w + 2)`.
    q: usize,
}

impl Geometry {
    fn new(h: usize, w: usize) -> Geometry {
        let pw = w + 2;
        Geometry {
            h,
            w,
            pw,
            plane: (h + 2) * pw,
            q: h * pw,
        }
    }
    /// Floats of a padded image of `c` channels, with slack past the last plane for the
    /// reads of the last register tile's padding positions (a multiple of 16).
    fn padded_len(&self, c: usize) -> usize {
        (c * self.plane + NR + 2 * self.pw + 2).next_multiple_of(16)
    }
    /// Offset of the input of tap `p = 9 ci + 3 ky + kx` from the output position.
    fn offset(&self, p: usize) -> u32 {
        let (ci, t) = (p / 9, p % 9);
        (ci * self.plane + (t / 3) * self.pw + t % 3) as u32
    }
    /// Copy `x (c, h, w)` into padded planes `xp` (zero border and slack).
    fn pad(&self, x: &[f32], c: usize, xp: &mut [f32]) {
        let (h, w, pw) = (self.h, self.w, self.pw);
        xp.fill(0.0);
        for ch in 0..c {
            let src = &x[ch * h * w..][..h * w];
            let dst = &mut xp[ch * self.plane..][..self.plane];
            for y in 0..h {
                dst[(y + 1) * pw + 1..][..w].copy_from_slice(&src[y * w..][..w]);
            }
        }
    }
    /// Copy `g (c, h, w)` into rows of `Q` (rounded up to 16) positions in the padded
    /// width, zero in the padding columns: `gp (c, q16)`.
    fn widen(&self, g: &[f32], c: usize, gp: &mut [f32]) {
        let (h, w, pw) = (self.h, self.w, self.pw);
        let q16 = self.q.next_multiple_of(16);
        gp[..c * q16].fill(0.0);
        for ch in 0..c {
            for y in 0..h {
                gp[ch * q16 + y * pw..][..w].copy_from_slice(&g[(ch * h + y) * w..][..w]);
            }
        }
    }
}

thread_local! {
    /// This thread's padded images and widened gradients, kept between calls.
    static SCRATCH: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
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

/// `y (+)= ` the convolution of x with the packed filters `a` (see [`pack_filters`]), one
/// task per image.
fn convolve(s: &Conv2d, x: &[f32], a: &[f32], y: &mut [f32], accumulate: bool) {
    let geo = Geometry::new(s.h, s.w);
    let k = 9 * s.c_in;
    let offs: Vec<u32> = (0..k).map(|p| geo.offset(p)).collect();
    let (img_in, img_out) = (s.c_in * s.h * s.w, s.c_out * s.h * s.w);
    y[..s.n * img_out]
        .par_chunks_mut(img_out)
        .zip(x[..s.n * img_in].par_chunks(img_in))
        .for_each(|(yi, xi)| {
            SCRATCH.with(|sc| {
                let mut bufs = sc.borrow_mut();
                let xp = aligned(&mut bufs.0, geo.padded_len(s.c_in));
                geo.pad(xi, s.c_in, xp);
                // SAFETY: AVX-512F is present (applies); xp holds the padded image with its
                // slack, a the packed strips, yi the image's c_out planes.
                unsafe { image_forward(&geo, s.c_out, k, a, &offs, xp, yi, accumulate) };
            })
        });
}

/// One image: every register tile of `y (c_out, h, w)`.
///
/// # Safety
/// AVX-512F must be present; `xp` is a padded image of `geo.padded_len` floats, `a` holds
/// `ceil(c_out / MR)` strips of `k MR` floats, `offs` k offsets, `y` `c_out h w` floats.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn image_forward(
    geo: &Geometry,
    c_out: usize,
    k: usize,
    a: &[f32],
    offs: &[u32],
    xp: &[f32],
    y: &mut [f32],
    accumulate: bool,
) {
    let hw = geo.h * geo.w;
    for q0 in (0..geo.q).step_by(NR) {
        // per vector: the lanes that are outputs (inside Q, not a padding column) and
        // where the first of them goes in the (h, w) plane; the rest follow contiguously
        let mut masks = [0u16; NV];
        let mut dests = [0usize; NV];
        for v in 0..NV {
            for l in 0..16 {
                let q = q0 + 16 * v + l;
                if q < geo.q && q % geo.pw < geo.w {
                    if masks[v] == 0 {
                        dests[v] = (q / geo.pw) * geo.w + q % geo.pw;
                    }
                    masks[v] |= 1 << l;
                }
            }
        }
        for (si, strip) in a.chunks_exact(k * MR).enumerate() {
            let rows = MR.min(c_out - si * MR);
            // SAFETY: every offset plus q0 + NR stays inside xp (padded_len's slack); the
            // stores address rows si MR.. < c_out of y at in-plane positions.
            unsafe {
                tile(
                    k,
                    strip.as_ptr(),
                    xp.as_ptr().add(q0),
                    offs.as_ptr(),
                    y.as_mut_ptr().add(si * MR * hw),
                    hw,
                    rows,
                    &masks,
                    &dests,
                    accumulate,
                )
            };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn image_forward(_: &Geometry, _: usize, _: usize, _: &[f32], _: &[u32], _: &[f32], _: &mut [f32], _: bool) {
    unreachable!("direct convolution: AVX-512 only")
}

/// One register tile: `y[i][dest..] (+)= Σ_p a[p MR + i] x[offs[p] + j]` for the [`MR`] rows
/// and [`NR`] positions j, stored through the per-vector lane masks (compress-stores).
///
/// # Safety
/// AVX-512F; `a` has `k MR` floats, `offs` k entries, `x[offs[p] + j]` is readable for
/// j < NR, and row i < rows of y (stride `rs`) is writable at the masked destinations.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn tile(
    k: usize,
    a: *const f32,
    x: *const f32,
    offs: *const u32,
    y: *mut f32,
    rs: usize,
    rows: usize,
    masks: &[u16; NV],
    dests: &[usize; NV],
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for p in 0..k {
        // SAFETY: p < k: the offset table entry, NR floats of x from it and MR of a.
        unsafe {
            let src = x.add(*offs.add(p) as usize);
            let bv: [__m512; NV] = [
                _mm512_loadu_ps(src),
                _mm512_loadu_ps(src.add(16)),
                _mm512_loadu_ps(src.add(32)),
            ];
            let ap = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(i));
                for v in 0..NV {
                    row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(rows) {
        for v in 0..NV {
            if masks[v] == 0 {
                continue;
            }
            // SAFETY: the set lanes of the mask go to consecutive in-plane positions from
            // dests[v] of row i (caller's contract).
            unsafe {
                let dst = y.add(i * rs + dests[v]);
                let val = if accumulate {
                    _mm512_add_ps(_mm512_maskz_expandloadu_ps(masks[v], dst), row[v])
                } else {
                    row[v]
                };
                _mm512_mask_compressstoreu_ps(dst, masks[v], val);
            }
        }
    }
}

/// Filter gradient: `dw (c_out, c_in, 3, 3) (+)= Σ_batch` of the correlation of x with dy.
/// Groups of [`images_per_dot`] images are dealt to [`LANES`] partial sums (group g to lane g
/// mod LANES), each summed in order; the partials are added in lane order.
pub fn backward_filter(s: &Conv2d, x: &[f32], dy: &[f32], dw: &mut [f32], accumulate: bool) {
    debug_assert!(applies(s));
    let geo = Geometry::new(s.h, s.w);
    let k = 9 * s.c_in;
    let wl = s.c_out * k;
    let offs: Vec<u32> = (0..k).map(|p| geo.offset(p)).collect();
    let (img_in, img_out) = (s.c_in * s.h * s.w, s.c_out * s.h * s.w);
    let q16 = geo.q.next_multiple_of(16);
    let (xs, gs) = (geo.padded_len(s.c_in), s.c_out * q16);
    let per = images_per_dot(q16);
    let groups = s.n.div_ceil(per);
    let mut partials = vec![0.0f32; LANES * wl];
    partials.par_chunks_mut(wl).enumerate().for_each(|(lane, part)| {
        SCRATCH.with(|sc| {
            let (xbuf, gbuf) = &mut *sc.borrow_mut();
            let xp = aligned(xbuf, per * xs);
            let gp = aligned(gbuf, per * gs);
            for gi in (lane..groups).step_by(LANES) {
                let b0 = gi * per;
                let nb = per.min(s.n - b0);
                for i in 0..nb {
                    geo.pad(&x[(b0 + i) * img_in..][..img_in], s.c_in, &mut xp[i * xs..][..xs]);
                    geo.widen(&dy[(b0 + i) * img_out..][..img_out], s.c_out, &mut gp[i * gs..][..gs]);
                }
                let images = Images {
                    count: nb,
                    g: gp,
                    g_stride: gs,
                    x: xp,
                    x_stride: xs,
                };
                // SAFETY: AVX-512F is present (applies); each image's gp holds c_out rows of
                // q16 floats, every column's run of q16 floats from its offset lies inside
                // that image's xp (its slack covers the rounding), part holds c_out x k.
                unsafe { dot_images(s.c_out, k, q16, &images, &offs, part) };
            }
        })
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

/// Images per filter-gradient group: about 1024 positions in all (a register tile's dot
/// products run over every image of its group before they are reduced), at most 16.
fn images_per_dot(q16: usize) -> usize {
    (1024 / q16).clamp(1, 16)
}

/// A group of images prepared for the filter gradient: widened output gradients `g` and
/// padded inputs `x`, image i at `i g_stride` and `i x_stride`.
struct Images<'a> {
    count: usize,
    g: &'a [f32],
    g_stride: usize,
    x: &'a [f32],
    x_stride: usize,
}

/// Rows and columns of the filter gradient's register tile (24 accumulators).
const TR: usize = 4;
const TC: usize = 6;

/// `part (m, k) += Σ_images G (m, q) · Xᵀ` where column j of an image's X is the run of q
/// floats at `x[offs[j]..]` and G's rows are `q` floats apart (q a multiple of 16).
///
/// # Safety
/// AVX-512F; as stated for the operands.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_images(m: usize, k: usize, q: usize, im: &Images, offs: &[u32], part: &mut [f32]) {
    use std::arch::x86_64::*;
    for j0 in (0..k).step_by(TC) {
        let cols = TC.min(k - j0);
        for i0 in (0..m).step_by(TR) {
            let rows = TR.min(m - i0);
            let mut acc = [[_mm512_setzero_ps(); TC]; TR];
            for img in 0..im.count {
                // rows and columns past the edge repeat the last one; they are not stored
                let xi = im.x.as_ptr().wrapping_add(img * im.x_stride);
                let gi = im.g.as_ptr().wrapping_add(img * im.g_stride);
                let bc: [*const f32; TC] = std::array::from_fn(|c| xi.wrapping_add(offs[j0 + c.min(cols - 1)] as usize));
                let ar: [*const f32; TR] = std::array::from_fn(|r| gi.wrapping_add((i0 + r.min(rows - 1)) * q));
                for e in (0..q).step_by(16) {
                    // SAFETY: e + 16 <= q: inside row i of G and column run c of x.
                    unsafe {
                        let av: [__m512; TR] = [
                            _mm512_load_ps(ar[0].add(e)),
                            _mm512_load_ps(ar[1].add(e)),
                            _mm512_load_ps(ar[2].add(e)),
                            _mm512_load_ps(ar[3].add(e)),
                        ];
                        for (c, &col) in bc.iter().enumerate() {
                            let bv = _mm512_loadu_ps(col.add(e));
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
unsafe fn dot_images(_: usize, _: usize, _: usize, _: &Images, _: &[u32], _: &mut [f32]) {
    unreachable!("direct convolution: AVX-512 only")
}
