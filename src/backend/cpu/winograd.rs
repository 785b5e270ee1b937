//! Winograd F(2x2, 3x3) and F(4x4, 3x3) convolution for 3x3 stride-1 pad-1 layers: forward,
//! data and filter gradients.
//!
//! Lavin and Gray's minimal filtering: an m x m output tile of a 3x3 correlation is
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for the (m+2) x (m+2) input patch d around it: for m = 2,
//! 16 multiplications instead of 36; for m = 4, 36 instead of 144. Over channels the
//! elementwise products become one matrix product per position ξ of the transformed tile
//! ((m+2)² of them):
//!
//! - forward: `M_ξ (c_out, P) = U_ξ (c_out, c_in) · V_ξ (c_in, P)` with `U = G g Gᵀ` per
//!   filter and `V = Bᵀ d B` per tile (P tiles), then `y = Aᵀ M A` per tile;
//! - data gradient: the same with the filter flipped and its channel axes swapped (a 3x3
//!   stride-1 pad-1 transposed convolution is that correlation);
//! - filter gradient: the forward formula differentiated, `dU_ξ = Σ_tiles dM_ξ Vᵀ_ξ` with
//!   `dM = A dY Aᵀ`, then `dg = Gᵀ dU G`. Exact in exact arithmetic, like the other two.
//!
//! Transformed tiles are stored channel-major, `[c][ξ][p]`, so that each channel's planes are
//! one contiguous block (a task per channel writes disjoint memory) and `V_ξ` is a matrix
//! with row stride (m+2)² P. Tiles cover the map in m x m steps; a map whose side is not a
//! multiple of m is padded with zeros and the outputs beyond it are dropped.
//!
//! Determinism: groups (forward, data gradient) and chunks (filter gradient) are sized from
//! the shape only; every output element is produced by one task, and the filter gradient sums
//! in a fixed order (lanes or chunks), so results are bit-identical for any thread count.
//!
//! Accuracy: F(2x2, 3x3)'s transforms use only ±1 and ±½, so its rounding stays within a
//! small factor of direct convolution's; F(4x4, 3x3)'s (entries up to 8 and 1/24) round about
//! ten times more. Both are tested in f64 and f32 against the direct reference with stated
//! bounds (`tests/ops.rs`).

use super::conv::add_lanes;
use super::gemm::{matmul, Mat, SendPtr};
use super::real::Real;
use super::scratch::ScratchPool;
use super::simd::{copy_row, simd_leaf};
use crate::ops::Conv2d;
use rayon::prelude::*;

/// The Winograd variant: m x m output tiles from (m + 2) x (m + 2) transformed tiles.
/// F(4x4, 3x3) does 2.25 multiplications per output against F(2x2, 3x3)'s 4 (direct: 9), with
/// costlier transforms and rounding a few times larger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// F(2x2, 3x3).
    F2,
    /// F(4x4, 3x3).
    F4,
}

impl Tile {
    /// Output tile side m.
    pub fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }
    /// Positions ξ of a transformed tile, (m + 2)².
    pub fn xi(self) -> usize {
        (self.m() + 2) * (self.m() + 2)
    }
}
/// Outputs per forward / data-gradient task (about; whole images per task): 1024, i.e. 256
/// F(2x2, 3x3) tiles or 64 F(4x4, 3x3) tiles.
pub const GROUP_OUTPUTS: usize = 1024;

/// Tiles per forward / data-gradient task.
fn group_tiles(tile: Tile) -> usize {
    GROUP_OUTPUTS / (tile.m() * tile.m())
}
/// Tiles per filter-gradient chunk (about; whole images per chunk).
pub const CHUNK_TILES: usize = 2048;
/// Most transformed elements (V and M together) per task or chunk: 4 Mi (16 MiB in f32).
const MAX_TRANSFORMED: usize = 1 << 22;
/// Groups come in multiples of this count when the batch allows (even split over 1-8 threads).
const TASK_MULTIPLE: usize = 8;

/// Whether Winograd F(2x2, 3x3) computes this convolution: 3x3, stride 1, pad 1.
pub fn applies(s: &Conv2d) -> bool {
    s.kh == 3 && s.kw == 3 && s.stride == 1 && s.pad == 1
}

/// Tiles per image `(rows, cols)`.
fn tiles(s: &Conv2d, tile: Tile) -> (usize, usize) {
    (s.h.div_ceil(tile.m()), s.w.div_ceil(tile.m()))
}

/// Images per task: about `target` tiles, at most [`MAX_TRANSFORMED`] transformed elements
/// where one image allows, and (for `multiple`) a task count that is a multiple of
/// [`TASK_MULTIPLE`]. Depends only on the shape.
fn images_per(s: &Conv2d, tile: Tile, target: usize, multiple: bool) -> usize {
    let n = s.n.max(1);
    let (th, tw) = tiles(s, tile);
    let per_image = th * tw;
    let total = n * per_image;
    let by_tiles = total.div_ceil(target.max(1));
    let by_memory = (total * tile.xi() * (s.c_in + s.c_out)).div_ceil(MAX_TRANSFORMED);
    let mut groups = by_tiles.max(by_memory).max(1);
    if multiple {
        groups = groups.next_multiple_of(TASK_MULTIPLE);
    }
    n.div_ceil(groups.min(n))
}

/// `u (4x4) = G g Gᵀ` for a 3x3 filter g (row-major), written at `u[ξ * stride]`.
#[inline]
fn filter_tile<T: Real>(g: [T; 9], u: &mut [T], stride: usize) {
    let half = T::from_f64(0.5);
    let mut t = [T::ZERO; 12]; // G g: (4, 3)
    for j in 0..3 {
        let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
        t[j] = a;
        t[3 + j] = half * (a + b + c);
        t[6 + j] = half * (a - b + c);
        t[9 + j] = c;
    }
    for i in 0..4 {
        let (a, b, c) = (t[3 * i], t[3 * i + 1], t[3 * i + 2]);
        u[(4 * i) * stride] = a;
        u[(4 * i + 1) * stride] = half * (a + b + c);
        u[(4 * i + 2) * stride] = half * (a - b + c);
        u[(4 * i + 3) * stride] = c;
    }
}

/// Transformed filters `u (ξ, cols, rows)` of `w (c_out, c_in, 3, 3)`: `U_ξ[co][ci]` at
/// `u[(ξ * c_in + ci) * c_out + co]` for the forward (`flip` false, rows = c_out), or of the
/// flipped filter, `U_ξ[ci][co]`, for the data gradient (`flip` true, rows = c_in). Each
/// `U_ξ` is stored transposed, so that a product reads a column of it (the `rows` values of
/// one input channel) contiguously. A task per column.
fn transform_filters<T: Real>(s: &Conv2d, tile: Tile, w: &[T], flip: bool, u: &mut [T]) {
    let (rows, cols) = if flip { (s.c_in, s.c_out) } else { (s.c_out, s.c_in) };
    let xi_n = tile.xi();
    let u = &mut u[..xi_n * cols * rows];
    let base = SendPtr(u.as_mut_ptr());
    (0..cols).into_par_iter().for_each(|c| {
        for r in 0..rows {
            let (co, ci) = if flip { (c, r) } else { (r, c) };
            let f = &w[(co * s.c_in + ci) * 9..][..9];
            let mut g = [T::ZERO; 9];
            for (k, v) in g.iter_mut().enumerate() {
                *v = if flip { f[8 - k] } else { f[k] };
            }
            let mut t = [T::ZERO; 36];
            match tile {
                Tile::F2 => filter_tile(g, &mut t, 1),
                Tile::F4 => filter_tile4(g, &mut t, 1),
            }
            for (xi, &v) in t[..xi_n].iter().enumerate() {
                // SAFETY: (ξ cols + c) rows + r < ξ_n cols rows = u.len(); task c alone
                // writes the elements of column c.
                unsafe { *base.add((xi * cols + c) * rows + r).0 = v };
            }
        }
    });
}

simd_leaf! {
/// `v[ξ * P + p0 + ty * tw + tx] = (Bᵀ d B)_ξ` for every tile of one channel plane `(h, w)`;
/// `pad` is scratch of at least `(2 th + 2) (2 tw + 2) + 4 (2 tw + 2)` elements.
fn input_transform<T: Real>(plane: &[T], h: usize, w: usize, v: &mut [T], big_p: usize, p0: usize, pad: &mut [T]) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let pw = 2 * tw + 2;
    let ph = 2 * th + 2;
    let (img, cols) = pad.split_at_mut(ph * pw);
    img.fill(T::ZERO);
    for y in 0..h {
        copy_row(&mut img[(y + 1) * pw + 1..][..w], &plane[y * w..][..w]);
    }
    let (c0, rest) = cols[..4 * pw].split_at_mut(pw);
    let (c1, rest) = rest.split_at_mut(pw);
    let (c2, c3) = rest.split_at_mut(pw);
    for ty in 0..th {
        // Bᵀ d over the four rows, for every column at once
        let r = |i: usize| &img[(2 * ty + i) * pw..][..pw];
        let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
        for j in 0..pw {
            c0[j] = r0[j] - r2[j];
            c1[j] = r1[j] + r2[j];
            c2[j] = r2[j] - r1[j];
            c3[j] = r1[j] - r3[j];
        }
        // (Bᵀ d) B per tile
        let base = p0 + ty * tw;
        for (i, c) in [&*c0, &*c1, &*c2, &*c3].into_iter().enumerate() {
            let (o0, rest) = v[(4 * i) * big_p + base..].split_at_mut(big_p);
            let (o1, rest) = rest.split_at_mut(big_p);
            let (o2, o3) = rest.split_at_mut(big_p);
            for tx in 0..tw {
                let j = 2 * tx;
                let (a, b, cc, e) = (c[j], c[j + 1], c[j + 2], c[j + 3]);
                o0[tx] = a - cc;
                o1[tx] = b + cc;
                o2[tx] = cc - b;
                o3[tx] = b - e;
            }
        }
    }
}
}

simd_leaf! {
/// `y (+)= Aᵀ M A` for every tile of one output channel plane `(h, w)`, reading
/// `m[ξ * P + p0 + ty * tw + tx]`; `rows` is scratch of at least `4 tw` elements.
fn output_transform<T: Real>(
    m: &[T],
    big_p: usize,
    p0: usize,
    size: (usize, usize),
    y: &mut [T],
    accumulate: bool,
    rows: &mut [T],
) {
    let (h, w) = size;
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let (y0, rest) = rows[..4 * tw].split_at_mut(2 * tw);
    let y1 = &mut rest[..2 * tw];
    for ty in 0..th {
        let base = p0 + ty * tw;
        let mm = |xi: usize| &m[xi * big_p + base..][..tw];
        let (m0, m1, m2, m3) = (mm(0), mm(1), mm(2), mm(3));
        let (m4, m5, m6, m7) = (mm(4), mm(5), mm(6), mm(7));
        let (m8, m9, m10, m11) = (mm(8), mm(9), mm(10), mm(11));
        let (m12, m13, m14, m15) = (mm(12), mm(13), mm(14), mm(15));
        for tx in 0..tw {
            // Aᵀ M: u0 = M0 + M1 + M2, u1 = M1 - M2 - M3 (rows of M, four columns)
            let u00 = m0[tx] + m4[tx] + m8[tx];
            let u01 = m1[tx] + m5[tx] + m9[tx];
            let u02 = m2[tx] + m6[tx] + m10[tx];
            let u03 = m3[tx] + m7[tx] + m11[tx];
            let u10 = m4[tx] - m8[tx] - m12[tx];
            let u11 = m5[tx] - m9[tx] - m13[tx];
            let u12 = m6[tx] - m10[tx] - m14[tx];
            let u13 = m7[tx] - m11[tx] - m15[tx];
            y0[2 * tx] = u00 + u01 + u02;
            y0[2 * tx + 1] = u01 - u02 - u03;
            y1[2 * tx] = u10 + u11 + u12;
            y1[2 * tx + 1] = u11 - u12 - u13;
        }
        for (dy, src) in [(0, &*y0), (1, &*y1)] {
            let oy = 2 * ty + dy;
            if oy >= h {
                continue;
            }
            let dst = &mut y[oy * w..][..w];
            if accumulate {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d += s;
                }
            } else {
                copy_row(dst, &src[..w]);
            }
        }
    }
}
}

simd_leaf! {
/// `dm[ξ * P + p0 + ty * tw + tx] = (A dY Aᵀ)_ξ` for every tile of one output-gradient
/// plane `(h, w)` (positions beyond the map count as zero); `pad` as for the input transform.
fn grad_transform<T: Real>(plane: &[T], h: usize, w: usize, dm: &mut [T], big_p: usize, p0: usize, pad: &mut [T]) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let pw = 2 * tw;
    let img = &mut pad[..2 * th * pw];
    if h % 2 == 1 || w % 2 == 1 {
        img.fill(T::ZERO);
    }
    for y in 0..h {
        copy_row(&mut img[y * pw..][..w], &plane[y * w..][..w]);
    }
    for ty in 0..th {
        let g0 = &img[2 * ty * pw..][..pw];
        let g1 = &img[(2 * ty + 1) * pw..][..pw];
        let base = p0 + ty * tw;
        for tx in 0..tw {
            let (a0, b0, a1, b1) = (g0[2 * tx], g0[2 * tx + 1], g1[2 * tx], g1[2 * tx + 1]);
            // A dY: rows y0, y0 + y1, y0 - y1, -y1; then each row [a, b] -> [a, a+b, a-b, -b]
            let rows = [(a0, b0), (a0 + a1, b0 + b1), (a0 - a1, b0 - b1), (-a1, -b1)];
            for (i, (a, b)) in rows.into_iter().enumerate() {
                dm[(4 * i) * big_p + base + tx] = a;
                dm[(4 * i + 1) * big_p + base + tx] = a + b;
                dm[(4 * i + 2) * big_p + base + tx] = a - b;
                dm[(4 * i + 3) * big_p + base + tx] = -b;
            }
        }
    }
}
}

/// Scratch elements the per-plane transforms need for an `(h, w)` map.
fn pad_len(h: usize, w: usize, tile: Tile) -> usize {
    let m = tile.m();
    let (th, tw) = (h.div_ceil(m), w.div_ceil(m));
    let padded = (m * th + 2) * (m * tw + 2);
    match tile {
        Tile::F2 => (padded + 4 * (2 * tw + 2)).max(4 * tw),
        Tile::F4 => padded,
    }
}

/// One input (or, for the filter gradient, output-gradient) plane transformed into `v`.
#[allow(clippy::too_many_arguments)]
fn transform_plane<T: Real>(
    tile: Tile,
    grad: bool,
    src: &[T],
    h: usize,
    w: usize,
    v: &mut [T],
    big_p: usize,
    p0: usize,
    aux: &mut [T],
) {
    match (tile, grad) {
        (Tile::F2, false) => input_transform(src, h, w, v, big_p, p0, aux),
        (Tile::F4, false) => input_transform4(src, h, w, v, big_p, p0, aux),
        (Tile::F2, true) => grad_transform(src, h, w, v, big_p, p0, aux),
        (Tile::F4, true) => grad_transform4(src, h, w, v, big_p, p0),
    }
}

/// The first `nb` images of `src (nb.., c, h, w)` transformed into `dst [c][ξ][p]`, P = nb
/// tiles per image (`grad`: as output gradients, else as inputs); one task, image by image.
#[allow(clippy::too_many_arguments)]
fn transform_images<T: Real>(
    s: &Conv2d,
    tile: Tile,
    grad: bool,
    src: &[T],
    c: usize,
    nb: usize,
    dst: &mut [T],
    aux: &mut [T],
) {
    let (th, tw) = tiles(s, tile);
    let (per_image, hw, xi_n) = (th * tw, s.h * s.w, tile.xi());
    let big_p = nb * per_image;
    for bi in 0..nb {
        for ch in 0..c {
            let plane = &src[(bi * c + ch) * hw..][..hw];
            let out = &mut dst[ch * xi_n * big_p..][..xi_n * big_p];
            transform_plane(tile, grad, plane, s.h, s.w, out, big_p, bi * per_image, aux);
        }
    }
}

/// `y (n, c_out, h, w) (+)= conv3x3(x (n, c_in, h, w))` with transformed filters
/// `u (ξ, c_in, c_out)`: the forward pass and (with the flipped filters) the data gradient.
fn convolve<T: Real>(s: &Conv2d, tile: Tile, x: &[T], u: &[T], y: &mut [T], accumulate: bool, pool: &ScratchPool<T>) {
    let (th, tw) = tiles(s, tile);
    let per_image = th * tw;
    let hw = s.h * s.w;
    let xi_n = tile.xi();
    let g = images_per(s, tile, group_tiles(tile), true);
    y[..s.n * s.c_out * hw]
        .par_chunks_mut(g * s.c_out * hw)
        .enumerate()
        .for_each(|(gi, yg)| {
            let b0 = gi * g;
            let nb = yg.len() / (s.c_out * hw);
            let big_p = nb * per_image;
            let (v_len, m_len) = (s.c_in * xi_n * big_p, s.c_out * xi_n * big_p);
            let aux = pad_len(s.h, s.w, tile);
            pool.with(v_len + m_len + aux, |buf| {
                let (v, rest) = buf.split_at_mut(v_len);
                let (m, aux) = rest.split_at_mut(m_len);
                transform_images(s, tile, false, &x[b0 * s.c_in * hw..], s.c_in, nb, v, aux);
                for xi in 0..xi_n {
                    let a = Mat {
                        data: &u[xi * s.c_in * s.c_out..],
                        rows: s.c_out,
                        cols: s.c_in,
                        rs: 1,
                        cs: s.c_out,
                    };
                    let b = Mat {
                        data: &v[xi * big_p..],
                        rows: s.c_in,
                        cols: big_p,
                        rs: xi_n * big_p,
                        cs: 1,
                    };
                    matmul(&mut m[xi * big_p..], xi_n * big_p, a, b, false, 1);
                }
                for bi in 0..nb {
                    for co in 0..s.c_out {
                        let mc = &m[co * xi_n * big_p..][..xi_n * big_p];
                        let dst = &mut yg[(bi * s.c_out + co) * hw..][..hw];
                        match tile {
                            Tile::F2 => output_transform(mc, big_p, bi * per_image, (s.h, s.w), dst, accumulate, aux),
                            Tile::F4 => output_transform4(mc, big_p, bi * per_image, (s.h, s.w), dst, accumulate),
                        }
                    }
                }
            });
        });
}

/// Forward: `y = conv(x, w)`. x `(n, c_in, h, w)`, w `(c_out, c_in, 3, 3)`, y `(n, c_out, h, w)`.
pub fn forward<T: Real>(s: &Conv2d, tile: Tile, x: &[T], w: &[T], y: &mut [T], pool: &ScratchPool<T>) {
    debug_assert!(applies(s));
    pool.with(tile.xi() * s.c_out * s.c_in, |u| {
        transform_filters(s, tile, w, false, u);
        convolve(s, tile, x, u, y, false, pool);
    });
}

/// Data gradient: `dx (+)= conv_transpose(dy, w)`, as the correlation of dy with the flipped
/// filter whose channel axes are swapped.
pub fn backward_data<T: Real>(
    s: &Conv2d,
    tile: Tile,
    dy: &[T],
    w: &[T],
    dx: &mut [T],
    accumulate: bool,
    pool: &ScratchPool<T>,
) {
    debug_assert!(applies(s));
    let t = Conv2d {
        c_in: s.c_out,
        c_out: s.c_in,
        ..*s
    };
    pool.with(tile.xi() * s.c_out * s.c_in, |u| {
        transform_filters(s, tile, w, true, u);
        convolve(&t, tile, dy, u, dx, accumulate, pool);
    });
}

/// Filter gradient: `dw (c_out, c_in, 3, 3) (+)= Σ_batch` of the correlation of x with dy.
pub fn backward_filter<T: Real>(
    s: &Conv2d,
    tile: Tile,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    accumulate: bool,
    pool: &ScratchPool<T>,
) {
    debug_assert!(applies(s));
    let plane = s.c_out * s.c_in;
    pool.with(tile.xi() * plane, |du| {
        if LANES * tile.xi() * plane <= LANES_MAX {
            transformed_grad_lanes(s, tile, x, dy, du, pool);
        } else {
            transformed_grad_chunks(s, tile, x, dy, du, pool);
        }
        untransform_grad(s, tile, du, dw, accumulate);
    });
}

/// Partial sums of the small-filter path of the filter gradient.
const LANES: usize = 8;
/// Most elements of all partial sums together (2 Mi f32 = 8 MiB): larger filters take the
/// chunked path.
const LANES_MAX: usize = 1 << 21;

/// `du (16, c_out, c_in) = Σ_tiles dM Vᵀ` for small filters: image groups (as in the forward)
/// are dealt to [`LANES`] lanes (group g to lane g mod LANES); each lane transforms its groups
/// and sums their products in order into a private partial, and the partials are added in
/// lane order. The transformed tiles stay in cache between transform and product.
fn transformed_grad_lanes<T: Real>(s: &Conv2d, tile: Tile, x: &[T], dy: &[T], du: &mut [T], pool: &ScratchPool<T>) {
    let (th, tw) = tiles(s, tile);
    let xi_n = tile.xi();
    let per_image = th * tw;
    let hw = s.h * s.w;
    let plane = s.c_out * s.c_in;
    let g = images_per(s, tile, group_tiles(tile), true);
    let groups = s.n.div_ceil(g);
    pool.with(LANES * xi_n * plane, |partials| {
        partials
            .par_chunks_mut(xi_n * plane)
            .enumerate()
            .for_each(|(lane, part)| {
                part.fill(T::ZERO);
                for gi in (lane..groups).step_by(LANES) {
                    let b0 = gi * g;
                    let nb = g.min(s.n - b0);
                    let big_p = nb * per_image;
                    let (v_len, m_len) = (s.c_in * xi_n * big_p, s.c_out * xi_n * big_p);
                    pool.with(v_len + m_len + pad_len(s.h, s.w, tile), |buf| {
                        let (v, rest) = buf.split_at_mut(v_len);
                        let (dm, aux) = rest.split_at_mut(m_len);
                        transform_images(s, tile, false, &x[b0 * s.c_in * hw..], s.c_in, nb, v, aux);
                        transform_images(s, tile, true, &dy[b0 * s.c_out * hw..], s.c_out, nb, dm, aux);
                        for xi in 0..xi_n {
                            let (a, b) = transformed_pair(s, xi_n, dm, v, xi, big_p);
                            matmul(&mut part[xi * plane..], s.c_in, a, b, true, 1);
                        }
                    });
                }
            });
        du.copy_from_slice(add_lanes(partials, xi_n * plane));
    });
}

/// The operands of `dU_ξ = dM_ξ (c_out, P) · V_ξᵀ (P, c_in)` in transformed tiles stored
/// `[c][ξ][p]`.
fn transformed_pair<'a, T>(
    s: &Conv2d,
    xi_n: usize,
    dm: &'a [T],
    v: &'a [T],
    xi: usize,
    big_p: usize,
) -> (Mat<'a, T>, Mat<'a, T>) {
    let a = Mat {
        data: &dm[xi * big_p..],
        rows: s.c_out,
        cols: big_p,
        rs: xi_n * big_p,
        cs: 1,
    };
    let b = Mat {
        data: &v[xi * big_p..],
        rows: big_p,
        cols: s.c_in,
        rs: 1,
        cs: xi_n * big_p,
    };
    (a, b)
}

/// `du (16, c_out, c_in) = Σ_tiles dM Vᵀ` for large filters: chunks of images in order; each
/// chunk is transformed a task per channel, then its 16 products are added a task per ξ.
fn transformed_grad_chunks<T: Real>(s: &Conv2d, tile: Tile, x: &[T], dy: &[T], du: &mut [T], pool: &ScratchPool<T>) {
    let (th, tw) = tiles(s, tile);
    let xi_n = tile.xi();
    let per_image = th * tw;
    let hw = s.h * s.w;
    let plane = s.c_out * s.c_in;
    let chunk = images_per(s, tile, CHUNK_TILES, false);
    du.fill(T::ZERO);
    let aux_len = pad_len(s.h, s.w, tile);
    let mut b0 = 0;
    while b0 < s.n {
        let nb = chunk.min(s.n - b0);
        let big_p = nb * per_image;
        let (v_len, m_len) = (s.c_in * xi_n * big_p, s.c_out * xi_n * big_p);
        pool.with(v_len + m_len, |buf| {
            let (v, dm) = buf.split_at_mut(v_len);
            // transform the chunk's inputs and output gradients, a task per channel
            v.par_chunks_mut(xi_n * big_p).enumerate().for_each(|(ci, vc)| {
                pool.with(aux_len, |aux| {
                    for bi in 0..nb {
                        let src = &x[((b0 + bi) * s.c_in + ci) * hw..][..hw];
                        transform_plane(tile, false, src, s.h, s.w, vc, big_p, bi * per_image, aux);
                    }
                })
            });
            dm.par_chunks_mut(xi_n * big_p).enumerate().for_each(|(co, mc)| {
                pool.with(aux_len, |aux| {
                    for bi in 0..nb {
                        let src = &dy[((b0 + bi) * s.c_out + co) * hw..][..hw];
                        transform_plane(tile, true, src, s.h, s.w, mc, big_p, bi * per_image, aux);
                    }
                })
            });
            // dU_ξ += dM_ξ (c_out, P) · V_ξᵀ (P, c_in), a task per ξ
            let (v, dm) = (&*v, &*dm);
            du.par_chunks_mut(plane).enumerate().for_each(|(xi, d)| {
                let (a, b) = transformed_pair(s, xi_n, dm, v, xi, big_p);
                matmul(d, s.c_in, a, b, true, 1);
            });
        });
        b0 += nb;
    }
}

/// `dw (c_out, c_in, 3, 3) (+)= Gᵀ dU G` per filter, from `du (16, c_out, c_in)`.
fn untransform_grad<T: Real>(s: &Conv2d, tile: Tile, du: &[T], dw: &mut [T], accumulate: bool) {
    let plane = s.c_out * s.c_in;
    dw[..s.w_len()]
        .par_chunks_mut(s.c_in * 9)
        .enumerate()
        .for_each(|(co, row)| {
            for ci in 0..s.c_in {
                let d = |xi: usize| du[xi * plane + co * s.c_in + ci];
                let vals = match tile {
                    Tile::F2 => untransform_tile2(d),
                    Tile::F4 => untransform_tile4(d),
                };
                let out = &mut row[ci * 9..][..9];
                for (o, v) in out.iter_mut().zip(vals) {
                    *o = if accumulate { *o + v } else { v };
                }
            }
        });
}

/// `dg (3x3) = Gᵀ dU G` for one filter's 4x4 transformed gradient `d(ξ)` (F(2x2, 3x3)).
#[inline]
fn untransform_tile2<T: Real>(d: impl Fn(usize) -> T) -> [T; 9] {
    let half = T::from_f64(0.5);
    let mut t = [T::ZERO; 12]; // Gᵀ dU: (3, 4)
    for j in 0..4 {
        let (a, b, c, e) = (d(j), d(4 + j), d(8 + j), d(12 + j));
        t[j] = a + half * (b + c);
        t[4 + j] = half * (b - c);
        t[8 + j] = half * (b + c) + e;
    }
    let mut out = [T::ZERO; 9];
    for i in 0..3 {
        let (a, b, c, e) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        out[3 * i] = a + half * (b + c);
        out[3 * i + 1] = half * (b - c);
        out[3 * i + 2] = half * (b + c) + e;
    }
    out
}

// ---- F(4x4, 3x3): 6x6 transformed tiles, interpolation points 0, ±1, ±2, ∞ ----
//
// Bᵀ = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
// G  = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]
// Aᵀ = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]

/// `Bᵀ d` for one column (or row) of six values.
#[inline(always)]
fn bt6<T: Real>(d: [T; 6]) -> [T; 6] {
    let (two, four, five) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(5.0));
    [
        four * d[0] - five * d[2] + d[4],
        d[3] + d[4] - four * (d[1] + d[2]),
        four * (d[1] - d[2]) + d[4] - d[3],
        two * (d[3] - d[1]) + d[4] - d[2],
        two * (d[1] - d[3]) + d[4] - d[2],
        four * d[1] - five * d[3] + d[5],
    ]
}

/// `G g` for one column (or row) of three filter values.
#[inline(always)]
fn g6<T: Real>(g: [T; 3]) -> [T; 6] {
    let c = |v: f64| T::from_f64(v);
    [
        c(0.25) * g[0],
        c(-1.0 / 6.0) * (g[0] + g[1] + g[2]),
        c(-1.0 / 6.0) * (g[0] - g[1] + g[2]),
        c(1.0 / 24.0) * g[0] + c(1.0 / 12.0) * g[1] + c(1.0 / 6.0) * g[2],
        c(1.0 / 24.0) * g[0] - c(1.0 / 12.0) * g[1] + c(1.0 / 6.0) * g[2],
        g[2],
    ]
}

/// `Aᵀ m` for one column (or row) of six values.
#[inline(always)]
fn at6<T: Real>(m: [T; 6]) -> [T; 4] {
    let (two, four, eight) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(8.0));
    let (s12, d12, s34, d34) = (m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]);
    [
        m[0] + s12 + s34,
        d12 + two * d34,
        s12 + four * s34,
        d12 + eight * d34 + m[5],
    ]
}

/// `A g` for one column (or row) of four output-gradient values (A = (Aᵀ)ᵀ).
#[inline(always)]
fn a6<T: Real>(g: [T; 4]) -> [T; 6] {
    let (two, four, eight) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(8.0));
    let (e, o) = (g[0] + g[2], g[1] + g[3]);
    let (e2, o2) = (g[0] + four * g[2], two * g[1] + eight * g[3]);
    [g[0], e + o, e - o, e2 + o2, e2 - o2, g[3]]
}

/// `Gᵀ d` for one column (or row) of six transformed-gradient values.
#[inline(always)]
fn gt6<T: Real>(d: [T; 6]) -> [T; 3] {
    let c = |v: f64| T::from_f64(v);
    [
        c(0.25) * d[0] - c(1.0 / 6.0) * (d[1] + d[2]) + c(1.0 / 24.0) * (d[3] + d[4]),
        c(1.0 / 6.0) * (d[2] - d[1]) + c(1.0 / 12.0) * (d[3] - d[4]),
        c(1.0 / 6.0) * (d[3] + d[4] - d[1] - d[2]) + d[5],
    ]
}

/// A 2-D transform `out = L t Rᵀ` of a square tile with the same 1-D map on columns and rows.
#[inline(always)]
fn both_axes<T: Real, const I: usize, const O: usize>(t: [[T; I]; I], f: impl Fn([T; I]) -> [T; O]) -> [[T; O]; O] {
    let mut cols = [[T::ZERO; I]; O]; // cols[o][i]: column i mapped
    for i in 0..I {
        let mut col = [T::ZERO; I];
        for (r, v) in col.iter_mut().enumerate() {
            *v = t[r][i];
        }
        let c = f(col);
        for o in 0..O {
            cols[o][i] = c[o];
        }
    }
    let mut out = [[T::ZERO; O]; O];
    for (o, row) in out.iter_mut().enumerate() {
        *row = f(cols[o]);
    }
    out
}

/// The `N x N` array of `f(i, j)`, written as plain loops: `std::array::from_fn` is not
/// inlined into the wide versions of the leaves, so its loop would run at the baseline width.
#[inline(always)]
fn square<T: Real, const N: usize>(f: impl Fn(usize, usize) -> T) -> [[T; N]; N] {
    let mut out = [[T::ZERO; N]; N];
    for (i, row) in out.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = f(i, j);
        }
    }
    out
}

/// `u (6x6) = G g Gᵀ` for a 3x3 filter g (row-major), written at `u[ξ * stride]`.
#[inline]
fn filter_tile4<T: Real>(g: [T; 9], u: &mut [T], stride: usize) {
    let t: [[T; 3]; 3] = std::array::from_fn(|r| [g[3 * r], g[3 * r + 1], g[3 * r + 2]]);
    let v = both_axes(t, g6);
    for i in 0..6 {
        for j in 0..6 {
            u[(6 * i + j) * stride] = v[i][j];
        }
    }
}

simd_leaf! {
/// F(4x4, 3x3) input transform: `v[ξ * P + p0 + ty * tw + tx] = (Bᵀ d B)_ξ` for every 6x6
/// patch d of one channel plane `(h, w)` (tiles every 4 pixels); `pad` holds at least
/// `(4 th + 2) (4 tw + 2)` elements.
fn input_transform4<T: Real>(plane: &[T], h: usize, w: usize, v: &mut [T], big_p: usize, p0: usize, pad: &mut [T]) {
    let (th, tw) = (h.div_ceil(4), w.div_ceil(4));
    let pw = 4 * tw + 2;
    let img = &mut pad[..(4 * th + 2) * pw];
    img.fill(T::ZERO);
    for y in 0..h {
        copy_row(&mut img[(y + 1) * pw + 1..][..w], &plane[y * w..][..w]);
    }
    for ty in 0..th {
        for tx in 0..tw {
            let d: [[T; 6]; 6] = square(|i, j| img[(4 * ty + i) * pw + 4 * tx + j]);
            let t = both_axes(d, bt6);
            let p = p0 + ty * tw + tx;
            for i in 0..6 {
                for j in 0..6 {
                    v[(6 * i + j) * big_p + p] = t[i][j];
                }
            }
        }
    }
}
}

simd_leaf! {
/// F(4x4, 3x3) output transform: `y (+)= Aᵀ M A` for every tile of one output plane
/// `(h, w)`, reading `m[ξ * P + p0 + ty * tw + tx]`.
fn output_transform4<T: Real>(m: &[T], big_p: usize, p0: usize, size: (usize, usize), y: &mut [T], accumulate: bool) {
    let (h, w) = size;
    let (th, tw) = (h.div_ceil(4), w.div_ceil(4));
    for ty in 0..th {
        for tx in 0..tw {
            let p = p0 + ty * tw + tx;
            let mm: [[T; 6]; 6] = square(|i, j| m[(6 * i + j) * big_p + p]);
            let out = both_axes(mm, at6);
            for (a, row) in out.iter().enumerate() {
                let oy = 4 * ty + a;
                if oy >= h {
                    break;
                }
                for (b, &val) in row.iter().enumerate() {
                    let ox = 4 * tx + b;
                    if ox >= w {
                        break;
                    }
                    let o = &mut y[oy * w + ox];
                    *o = if accumulate { *o + val } else { val };
                }
            }
        }
    }
}
}

simd_leaf! {
/// F(4x4, 3x3) output-gradient transform: `dm[ξ * P + p0 + ty * tw + tx] = (A dY Aᵀ)_ξ` for
/// every 4x4 tile of one plane `(h, w)` (positions beyond the map count as zero).
fn grad_transform4<T: Real>(plane: &[T], h: usize, w: usize, dm: &mut [T], big_p: usize, p0: usize) {
    let (th, tw) = (h.div_ceil(4), w.div_ceil(4));
    for ty in 0..th {
        for tx in 0..tw {
            let g: [[T; 4]; 4] = square(|a, b| {
                let (oy, ox) = (4 * ty + a, 4 * tx + b);
                if oy < h && ox < w {
                    plane[oy * w + ox]
                } else {
                    T::ZERO
                }
            });
            let t = both_axes(g, a6);
            let p = p0 + ty * tw + tx;
            for i in 0..6 {
                for j in 0..6 {
                    dm[(6 * i + j) * big_p + p] = t[i][j];
                }
            }
        }
    }
}
}

/// `dg (3x3) = Gᵀ dU G` for one filter's 6x6 transformed gradient `d(ξ)`.
#[inline]
fn untransform_tile4<T: Real>(d: impl Fn(usize) -> T) -> [T; 9] {
    let t: [[T; 6]; 6] = std::array::from_fn(|i| std::array::from_fn(|j| d(6 * i + j)));
    let g = both_axes(t, gt6);
    std::array::from_fn(|k| g[k / 3][k % 3])
}
