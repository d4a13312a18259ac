"""RSP's three products for a stride-1 convolution as implicit GEMMs (Triton), with the
sectional normalisation fused into the responses.

With x the rectified input in channels-last layout (N, H, W, C), Rs the sections interleaved
(N, 2·O, L: row 2·o is R⁺ = max(R, 0) of output o, row 2·o + 1 its R⁻ = max(−R, 0); the order of
the 2·O rows is the products' own, so one that keeps both of an output's next to each other lets
the normalisation read R once for both) over the L = Ho·Wo output positions and t = (ky, kx) a
tap of the kernel, the patches are (zero off the image)
  Xᵤ[(t, c), l] = x[n, i(l) + ky·dy − pt, j(l) + kx·dx − pl, c], and
  filters          F[n, t, m, c] = Σ_l Rs[n, m, l] · Xᵤ[(t, c), l]
  responses        S[n, l, m] = normalise(Rs, Σ_(t, c) F[n, t, m, c] · Xᵤ[(t, c), l])
  back-projection  dx[n, c, y, x] = Σ_(t, m) F[n, t, m, c] · S[n, l(y, x, t), m]
Each reads x, S and F where they lie, never unfolding the patches: a tap moves whole rows of
channels (contiguous in channels-last), so the loads stay aligned for the tensor cores; the
responses never reach memory, only S, position-major as the back-projection reads it (the
filters read Rs stacked in the products' precision, the normalisation R itself). cuDNN
runs the same products as grouped convolutions of NCHW tensors that it transposes to NHWC and
back around every call (28 % of an H100's kernel time on VGG16 in bfloat16). Each sample has
its own filters, so the samples are a grid dimension.
Around them, each tensor the size of a layer's input or output is passed over as few times as
possible: one pass makes the input rectified, scaled, cast and channels-last (``pack_input``),
one the stacked sections (``stack_sections``), and the back-projection's epilogue writes the
purge's 2·x̂⊙dx and counts its non-zeros (``Combination``), leaving the purge only its shift.
TF32 tensor cores read an operand from shared memory only with its summed axis contiguous: the
back-projection then reads a copy of F laid out so (``_filters_for_back``), and the filters can
read their patches from shifted positions-major copies of the input (``Tiles.shifted``). The
responses can instead have the tensor memory accelerator copy their patches and filters
(``Tiles.tma``): a tile's positions are then a box of the output, and a tap's patches one box of x.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rsp_fast.kernels.triton import GRID_YZ_LIMIT  # absolute: benchmarks load this file alone as a baseline
from rsp_fast.tf32 import matmul_tf32


@triton.jit
def _dot(a, b, acc, FP64: tl.constexpr, TF32: tl.constexpr):
    if TF32:  # float32 operands on TF32 tensor cores, as torch's products do under allow_tf32
        out = tl.dot(a, b, acc, input_precision="tf32")
    elif FP64:
        out = acc + tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision="ieee")
    return out


@triton.jit
def _rectified(v):
    """max(v, 0) keeping a NaN, as torch's clamp does (tl.maximum lowers to a max that returns
    the other operand: a NaN became 0, and a map that should be refused came out finite)."""
    return tl.where(v < 0, tl.zeros_like(v), v)


@triton.jit
def _normalised(acc, r_ptr, rl, valid, ro, O, srm, srl, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr):
    """S for a tile of positions rl (``valid`` the real ones) and interleaved section columns (those of outputs ro): where
    R ≠ 0 only its own section's response is read, S = R/G there (R⁺/G⁺, or −R⁻/G⁻ for the
    hostile section) where G ≠ 0, zero elsewhere. Each R is read once for both of its columns and
    divided once, which also halves the registers the epilogue holds beside the accumulator."""
    pos, neg = tl.split(tl.reshape(acc, (BLOCK_L, BLOCK_M // 2, 2)))
    r = tl.load(r_ptr + ro[None, :] * srm + rl[:, None] * srl, mask=valid[:, None] & (ro[None, :] < O),
                other=0.0).to(acc.dtype)
    g = tl.where(r > 0, pos, neg)
    active = (r != 0) & (g != 0)
    s = tl.where(active, r / tl.where(active, g, 1.0), 0.0)
    # a NaN R fails both comparisons: NaN in both sections, as in the reference (the map is then refused)
    return tl.reshape(tl.join(tl.where(~(r <= 0), s, 0.0), tl.where(~(r >= 0), s, 0.0)), (BLOCK_L, BLOCK_M))


@triton.jit
def _patch_rows(x_base, i, j, valid, ky, kx, rc, C, H, W, DY, DX, PT, PL, sxh, sxw):
    """Xᵤ[(t, c), l] for the positions at output rows i, columns j (rows of the tile; ``valid``
    marks the real ones) and channels rc (columns): the input pixel each reads at tap (ky, kx),
    zero off the image."""
    y = i + ky * DY - PT
    x = j + kx * DX - PL
    inside = valid & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    return tl.load(x_base + (y * sxh + x * sxw)[:, None] + rc[None, :], mask=inside[:, None] & (rc[None, :] < C),
                   other=0.0)


@triton.jit
def _filters_kernel(r_ptr, x_ptr, f_ptr, M, C, L, H, W, Wo, KW, DY, DX, PT, PL, T, SPLIT, L_PER_SPLIT, WP,
                    srn, srm, srl, sxn, sxh, sxw, sxs, sxc, sfs, sfn, sft, sfm,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, FP64: tl.constexpr,
                    TF32: tl.constexpr, SHIFTED: tl.constexpr, ALIGN: tl.constexpr):
    """F[split, n, t, m-block, c-block] = Σ over this split's positions l of Rs[n, m, l]·Xᵤ[(t, c), l].
    SHIFTED: the positions lie on the padded input's grid (l = i·WP + j, ``ShiftedOperands``) and
    the patches are read from positions-major copies of the padded input, x[s, n, c, f] = pixel
    f + s (strides sxs, sxn, sxc): tap t's rows start at l + ky·dy·WP + kx·dx, a multiple of
    ALIGN (16 bytes) in the copy shifted by the rest, so that rows load 16 bytes at a time with
    their summed axis contiguous, as TF32 tensor cores take them; every block whole, no mask."""
    pid_m, pid_c, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, rest = pid // (T * SPLIT), pid % (T * SPLIT)
    t, split = rest // SPLIT, rest % SPLIT
    ky, kx = t // KW, t % KW
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_base = r_ptr + n.to(tl.int64) * srn
    x_base = x_ptr + n.to(tl.int64) * sxn
    if SHIFTED:  # where tap t's rows start, in the copy shifted by shift % ALIGN
        shift = ky * DY * WP + kx * DX
        x_tap = x_base + (shift % ALIGN).to(tl.int64) * sxs + (shift // ALIGN) * ALIGN
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float64 if FP64 else tl.float32)
    l_start = split * L_PER_SPLIT
    l_end = tl.minimum(L, l_start + L_PER_SPLIT)
    for l0 in range(l_start, l_end, BLOCK_L):
        rl = l0 + tl.arange(0, BLOCK_L)
        if SHIFTED:
            r = tl.load(r_base + rm[:, None] * srm + rl[None, :] * srl, mask=rm[:, None] < M, other=0.0)
            xv = tl.load(x_tap + rl[:, None] + rc[None, :] * sxc, mask=rc[None, :] < C, other=0.0)
        else:
            in_range = rl < l_end
            r = tl.load(r_base + rm[:, None] * srm + rl[None, :] * srl, mask=(rm[:, None] < M) & in_range[None, :],
                        other=0.0)
            xv = _patch_rows(x_base, rl // Wo, rl % Wo, in_range, ky, kx, rc, C, H, W, DY, DX, PT, PL, sxh, sxw)
        acc = _dot(r, xv, acc, FP64, TF32)
    f_base = f_ptr + split.to(tl.int64) * sfs + n.to(tl.int64) * sfn + t * sft
    tl.store(f_base + rm[:, None] * sfm + rc[None, :], acc.to(f_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rc[None, :] < C))


@triton.jit
def _filters_tma_kernel(r_desc, x_desc, f_ptr, O, C, Ho, Wo, KW, DY, DX, PT, PL, T, SPLIT, BOXES_PER_SPLIT,
                        sfs, sfn, sft, sfm, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                        BOX_W: tl.constexpr, FP64: tl.constexpr, TF32: tl.constexpr):
    """The filters of a TMA launch (``Tiles.tma``), F[split, n, t, m-block, c-block]: the positions
    summed over in boxes of the output, BLOCK_L // BOX_W rows of BOX_W; R (N, O, Ho, Wo) and x
    (N, H, W, C) read through the tensor descriptors r_desc and x_desc, one box each per step,
    zero past the edges. R⁺ and R⁻ are formed from R in registers, in the products' precision, and
    multiplied into an accumulator each: no stacked sections are written or read. F's rows
    interleaved as the stacked sections' are (2·o: R⁺, 2·o + 1: R⁻)."""
    pid_m, pid_c, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, rest = pid // (T * SPLIT), pid % (T * SPLIT)
    t, split = rest // SPLIT, rest % SPLIT
    ky, kx = t // KW, t % KW
    HALF: tl.constexpr = BLOCK_M // 2
    o0, c0 = pid_m * HALF, pid_c * BLOCK_C
    target = tl.zeros((HALF, BLOCK_C), dtype=tl.float64 if FP64 else tl.float32)
    hostile = tl.zeros((HALF, BLOCK_C), dtype=tl.float64 if FP64 else tl.float32)
    boxes = _position_tiles(Ho * Wo, Wo, BLOCK_L, True, BOX_W)
    for box in range(split * BOXES_PER_SPLIT, tl.minimum(boxes, (split + 1) * BOXES_PER_SPLIT)):
        i0, j0, _, _ = _box_rows(box, Wo, BLOCK_L, BOX_W)
        r = r_desc.load([n, o0, i0, j0]).reshape(HALF, BLOCK_L)
        xv = x_desc.load([n, i0 + ky * DY - PT, j0 + kx * DX - PL, c0]).reshape(BLOCK_L, BLOCK_C)
        target = _dot(_rectified(r).to(xv.dtype), xv, target, FP64, TF32)
        hostile = _dot(_rectified(-r).to(xv.dtype), xv, hostile, FP64, TF32)
    ro = o0 + tl.arange(0, HALF)
    rc = c0 + tl.arange(0, BLOCK_C)
    rows = f_ptr + split.to(tl.int64) * sfs + n.to(tl.int64) * sfn + t * sft + (2 * ro)[:, None] * sfm + rc[None, :]
    mask = (ro[:, None] < O) & (rc[None, :] < C)
    tl.store(rows, target.to(f_ptr.dtype.element_ty), mask=mask)
    tl.store(rows + sfm, hostile.to(f_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_coords(tile, tiles_rows, tiles_cols):
    """A persistent program's tile number as (row block, column block, sample): row blocks
    fastest, then column blocks, then samples."""
    return tile % tiles_rows, (tile // tiles_rows) % tiles_cols, tile // (tiles_rows * tiles_cols)


@triton.jit
def _responses_kernel(x_ptr, f_ptr, r_ptr, s_ptr, N, O, C, L, H, W, Wo, KW, DY, DX, PT, PL, T,
                      sxn, sxh, sxw, sfn, sft, sfm, srn, srm, srl, ssn, ssl,
                      BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, FP64: tl.constexpr,
                      TF32: tl.constexpr, GRAM: tl.constexpr, PERSISTENT: tl.constexpr, TMA: tl.constexpr,
                      BOX_W: tl.constexpr):
    """S[n, l-block, m-block]: the responses over every tap and channel, then the normalisation.
    GRAM: the Gram path's patch Gram K[n, l-block, l'-block] = Σ_(t, c) Xᵤ[(t, c), l]·Xᵤ[(t, c), l']
    instead (the columns are positions too, read from x like the rows), stored as it is.
    PERSISTENT: each program loops over tiles (positions fastest, then columns, then samples),
    the loop nest flattened so that the next tile's loads are in flight during this one's
    epilogue (``Tiles.programs``); otherwise one tile per program of a 3-D grid.
    TMA (``Tiles.tma``): x_ptr and f_ptr are tensor descriptors of x (N, H, W, C) and F (N, T, M, C),
    and a tile's positions are a box of the output, BLOCK_L // BOX_W rows of BOX_W, whose patches at
    a tap are one box of x that the tensor memory accelerator copies, zero off the image."""
    M = L if GRAM else 2 * O  # the columns
    if PERSISTENT:
        tiles_l, tiles_m = _position_tiles(L, Wo, BLOCK_L, TMA, BOX_W), tl.cdiv(M, BLOCK_M)
        for tile in tl.range(tl.program_id(0), tiles_l * tiles_m * N, tl.num_programs(0), flatten=True):
            pid_l, pid_m, n = _tile_coords(tile, tiles_l, tiles_m)
            _responses_tile(pid_l, pid_m, n, x_ptr, f_ptr, r_ptr, s_ptr, O, C, L, M, H, W, Wo, KW, DY, DX, PT, PL, T,
                            sxn, sxh, sxw, sfn, sft, sfm, srn, srm, srl, ssn, ssl, BLOCK_L, BLOCK_M, BLOCK_C, FP64,
                            TF32, GRAM, TMA, BOX_W)
    else:
        _responses_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), x_ptr, f_ptr, r_ptr, s_ptr, O, C, L, M,
                        H, W, Wo, KW, DY, DX, PT, PL, T, sxn, sxh, sxw, sfn, sft, sfm, srn, srm, srl, ssn, ssl,
                        BLOCK_L, BLOCK_M, BLOCK_C, FP64, TF32, GRAM, TMA, BOX_W)


@triton.jit
def _position_tiles(P, width, BLOCK: tl.constexpr, TMA: tl.constexpr, BOX_W: tl.constexpr):
    """How many tiles the P positions (or pixels) of a grid ``width`` wide take: blocks of BLOCK
    in order, or (TMA) boxes BLOCK // BOX_W rows high and BOX_W wide."""
    if TMA:
        count = tl.cdiv(P // width, BLOCK // BOX_W) * tl.cdiv(width, BOX_W)
    else:
        count = tl.cdiv(P, BLOCK)
    return count


@triton.jit
def _responses_tile(pid_l, pid_m, n, x_ptr, f_ptr, r_ptr, s_ptr, O, C, L, M, H, W, Wo, KW, DY, DX, PT, PL, T,
                    sxn, sxh, sxw, sfn, sft, sfm, srn, srm, srl, ssn, ssl,
                    BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, FP64: tl.constexpr,
                    TF32: tl.constexpr, GRAM: tl.constexpr, TMA: tl.constexpr, BOX_W: tl.constexpr):
    """One tile of ``_responses_kernel``: positions of block pid_l, columns of block pid_m, sample n."""
    if TMA:  # the box's top-left output position, and each row's (i, j) in it
        i0, j0, i, j = _box_rows(pid_l, Wo, BLOCK_L, BOX_W)
        rl = i * Wo + j
        valid = (i < L // Wo) & (j < Wo)
    else:
        rl = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        i, j = rl // Wo, rl % Wo
        valid = rl < L
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if not TMA:
        x_base = x_ptr + n.to(tl.int64) * sxn
        f_base = f_ptr + n.to(tl.int64) * sfn
        im, jm = rm // Wo, rm % Wo  # GRAM: the columns' positions
    acc = tl.zeros((BLOCK_L, BLOCK_M), dtype=tl.float64 if FP64 else tl.float32)
    c_blocks = tl.cdiv(C, BLOCK_C)
    for k in range(0, T * c_blocks):  # one loop over (tap, channel block): it pipelines as one
        t, c0 = k // c_blocks, (k % c_blocks) * BLOCK_C
        if TMA:
            xv = x_ptr.load([n, i0 + (t // KW) * DY - PT, j0 + (t % KW) * DX - PL, c0]).reshape(BLOCK_L, BLOCK_C)
            f = tl.trans(f_ptr.load([n, t, pid_m * BLOCK_M, c0]).reshape(BLOCK_M, BLOCK_C))
        else:
            rc = c0 + tl.arange(0, BLOCK_C)
            xv = _patch_rows(x_base, i, j, valid, t // KW, t % KW, rc, C, H, W, DY, DX, PT, PL, sxh, sxw)
            if GRAM:
                f = tl.trans(_patch_rows(x_base, im, jm, rm < M, t // KW, t % KW, rc, C, H, W, DY, DX, PT, PL, sxh,
                                         sxw))
            else:
                f = tl.load(f_base + t * sft + rm[None, :] * sfm + rc[:, None], mask=(rc[:, None] < C) & (rm[None, :] < M),
                            other=0.0)
        acc = _dot(xv, f, acc, FP64, TF32)
    mask = valid[:, None] & (rm[None, :] < M)
    if GRAM:
        out = acc
    else:
        ro = pid_m * (BLOCK_M // 2) + tl.arange(0, BLOCK_M // 2)
        out = _normalised(acc, r_ptr + n.to(tl.int64) * srn, rl, valid, ro, O, srm, srl, BLOCK_L, BLOCK_M)
    tl.store(s_ptr + n.to(tl.int64) * ssn + rl[:, None] * ssl + rm[None, :], out.to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _back_kernel(s_ptr, f_ptr, xcl_ptr, dx_ptr, x_ptr, scale_ptr, counts_ptr, N, M, C, H, W, Ho, Wo, KW, DY, DX, PT, PL,
                 T, ssn, ssl, sfn, sft, sfm, sfc, scn, sch, scw, sdn, sdc, sxn, sxc, sxp,
                 BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, FP64: tl.constexpr,
                 TF32: tl.constexpr, GRAM: tl.constexpr, COMBINE: tl.constexpr, PURGE: tl.constexpr,
                 PERSISTENT: tl.constexpr, TMA: tl.constexpr, BOX_W: tl.constexpr, F_T: tl.constexpr):
    """dx[n, c-block, pixel-block] = Σ over taps and sections of F·S, each pixel gathering the
    output positions whose patches hold it. GRAM: the Gram path's Σ over taps and positions l' of
    Xᵤ[(t, c), l']·M[l', l], with s_ptr holding Mᵀ (N, L, L) and Xᵤ read from the channels-last
    input at xcl_ptr in place of F. COMBINE: written as x̂⊙dx instead, x̂ = max(x, 0)·scale
    (PURGE: 2·x̂⊙dx, its non-zeros counted per sample). PERSISTENT: as ``_responses_kernel``'s
    (pixels fastest, then channels, then samples). F is read at its strides (sfm, sfc): either
    of its last two axes may be the contiguous one (``_filters_for_back``). TMA (``Tiles.tma``):
    s_ptr and f_ptr are tensor descriptors of S (N, Ho, Wo, M) and of F (N, T, M, C), or (F_T: its
    sections contiguous) of F's transpose (N, T, C, M); a tile's pixels are a box of the input,
    BLOCK_Q // BOX_W rows of BOX_W, whose sections at a tap are one box of S, zero off the output."""
    if PERSISTENT:
        tiles_q, tiles_c = _position_tiles(H * W, W, BLOCK_Q, TMA, BOX_W), tl.cdiv(C, BLOCK_C)
        for tile in tl.range(tl.program_id(0), tiles_q * tiles_c * N, tl.num_programs(0), flatten=True):
            pid_q, pid_c, n = _tile_coords(tile, tiles_q, tiles_c)
            _back_tile(pid_q, pid_c, n, s_ptr, f_ptr, xcl_ptr, dx_ptr, x_ptr, scale_ptr, counts_ptr, M, C, H, W, Ho,
                       Wo, KW, DY, DX, PT, PL, T, ssn, ssl, sfn, sft, sfm, sfc, scn, sch, scw, sdn, sdc, sxn, sxc, sxp,
                       BLOCK_Q, BLOCK_C, BLOCK_M, FP64, TF32, GRAM, COMBINE, PURGE, TMA, BOX_W, F_T)
    else:
        _back_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), s_ptr, f_ptr, xcl_ptr, dx_ptr, x_ptr,
                   scale_ptr, counts_ptr, M, C, H, W, Ho, Wo, KW, DY, DX, PT, PL, T, ssn, ssl, sfn, sft, sfm, sfc, scn,
                   sch, scw, sdn, sdc, sxn, sxc, sxp, BLOCK_Q, BLOCK_C, BLOCK_M, FP64, TF32, GRAM, COMBINE, PURGE, TMA,
                   BOX_W, F_T)


@triton.jit
def _box_rows(pid, width, BLOCK: tl.constexpr, BOX_W: tl.constexpr):
    """The top-left (row, column) of box pid, boxes BLOCK // BOX_W rows high and BOX_W wide
    laid over a grid ``width`` wide, and each of the box's BLOCK positions' (row, column)."""
    q = tl.arange(0, BLOCK)
    row0 = (pid // tl.cdiv(width, BOX_W)) * (BLOCK // BOX_W)
    col0 = (pid % tl.cdiv(width, BOX_W)) * BOX_W
    return row0, col0, row0 + q // BOX_W, col0 + q % BOX_W


@triton.jit
def _back_tile(pid_q, pid_c, n, s_ptr, f_ptr, xcl_ptr, dx_ptr, x_ptr, scale_ptr, counts_ptr, M, C, H, W, Ho, Wo, KW, DY,
               DX, PT, PL, T, ssn, ssl, sfn, sft, sfm, sfc, scn, sch, scw, sdn, sdc, sxn, sxc, sxp,
               BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, FP64: tl.constexpr,
               TF32: tl.constexpr, GRAM: tl.constexpr, COMBINE: tl.constexpr, PURGE: tl.constexpr, TMA: tl.constexpr,
               BOX_W: tl.constexpr, F_T: tl.constexpr):
    """One tile of ``_back_kernel``: pixels of block pid_q, channels of block pid_c, sample n."""
    if TMA:
        y0, x0, y, x = _box_rows(pid_q, W, BLOCK_Q, BOX_W)
        rq = y * W + x
        valid = (y < H) & (x < W)
    else:
        rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        y, x = rq // W, rq % W
        valid = rq < H * W
        s_base = s_ptr + n.to(tl.int64) * ssn
        f_base = f_ptr + n.to(tl.int64) * sfn
        xcl_base = xcl_ptr + n.to(tl.int64) * scn
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float64 if FP64 else tl.float32)
    m_blocks = tl.cdiv(M, BLOCK_M)
    for k in range(0, T * m_blocks):
        t, m0 = k // m_blocks, (k % m_blocks) * BLOCK_M
        if TMA:  # the box of output positions this tap reads, and F's block
            sv = s_ptr.load([n, y0 + PT - (t // KW) * DY, x0 + PL - (t % KW) * DX, m0]).reshape(BLOCK_Q, BLOCK_M)
            if F_T:
                f = tl.trans(f_ptr.load([n, t, pid_c * BLOCK_C, m0]).reshape(BLOCK_C, BLOCK_M))
            else:
                f = f_ptr.load([n, t, m0, pid_c * BLOCK_C]).reshape(BLOCK_M, BLOCK_C)
        else:
            i = y + PT - (t // KW) * DY
            j = x + PL - (t % KW) * DX
            inside = valid & (i >= 0) & (i < Ho) & (j >= 0) & (j < Wo)
            rm = m0 + tl.arange(0, BLOCK_M)
            sv = tl.load(s_base + (i * Wo + j)[:, None] * ssl + rm[None, :], mask=inside[:, None] & (rm[None, :] < M),
                         other=0.0)
            if GRAM:
                f = _patch_rows(xcl_base, rm // Wo, rm % Wo, rm < M, t // KW, t % KW, rc, C, H, W, DY, DX, PT, PL, sch,
                                scw)
            else:
                f = tl.load(f_base + t * sft + rm[:, None] * sfm + rc[None, :] * sfc,
                            mask=(rm[:, None] < M) & (rc[None, :] < C), other=0.0)
        acc = _dot(sv, f, acc, FP64, TF32)
    mask = valid[:, None] & (rc[None, :] < C)  # (a TMA box's pixels past the input's edge: x̂ is zero there)
    if COMBINE:  # x̂ formed as rectified_input forms it, the product as the purge's (2·x̂)·dx
        xv = tl.load(x_ptr + n.to(tl.int64) * sxn + rc[None, :] * sxc + rq[:, None] * sxp, mask=mask, other=0.0)
        x_hat = _rectified(xv) * tl.load(scale_ptr + n)
        if PURGE:
            x_hat = 2.0 * x_hat
        acc = x_hat.to(acc.dtype) * acc
    out = acc.to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + n.to(tl.int64) * sdn + rc[None, :] * sdc + rq[:, None], out, mask=mask)
    if PURGE:
        tl.atomic_add(counts_ptr + n, tl.sum(tl.sum((out != 0).to(tl.int32), axis=1), axis=0))


@triton.jit
def _pack_kernel(x_ptr, scale_ptr, out_ptr, C, P, sxn, sxc, sxp, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[n, p, c] = max(x[n, c, p], 0)·scale[n] in out's precision: the products' input,
    rectified, scaled, cast and made channels-last in one pass."""
    pid_p, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (rc[:, None] < C) & (rp[None, :] < P)
    v = tl.load(x_ptr + n.to(tl.int64) * sxn + rc[:, None] * sxc + rp[None, :] * sxp, mask=mask, other=0.0)
    v = _rectified(v) * tl.load(scale_ptr + n)
    tl.store(out_ptr + n.to(tl.int64) * P * C + rp[None, :] * C + rc[:, None], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stack_kernel(r_ptr, out_ptr, O, L, LP, WO, WIDTH, BLOCK: tl.constexpr, INTERLEAVE: tl.constexpr,
                  ON_GRID: tl.constexpr):
    """Row (n, o) of R (L values) as rows o and O + o of out[n] (INTERLEAVE: 2·o and 2·o + 1; LP
    values each, zeros past L): R⁺ and R⁻ in out's precision, R read once. ON_GRID: out's
    position i holds R's row i // WIDTH, column i % WIDTH of an output WO wide (zero past it)."""
    row, pid = tl.program_id(0), tl.program_id(1)
    n, o = row // O, row % O
    i = pid * BLOCK + tl.arange(0, BLOCK)
    if ON_GRID:
        col = i % WIDTH
        src = (i // WIDTH) * WO + col
        r = tl.load(r_ptr + row.to(tl.int64) * L + src, mask=(col < WO) & (src < L), other=0.0)
    else:
        r = tl.load(r_ptr + row.to(tl.int64) * L + i, mask=i < L, other=0.0)
    hostile = LP if INTERLEAVE else O * LP  # from the target row to its hostile row
    out = out_ptr + (n.to(tl.int64) * 2 * O + (2 * o if INTERLEAVE else o)) * LP + i
    tl.store(out, _rectified(r).to(out_ptr.dtype.element_ty), mask=i < LP)
    tl.store(out + hostile, _rectified(-r).to(out_ptr.dtype.element_ty), mask=i < LP)


@triton.jit
def _shifted_copies_kernel(x_ptr, out_ptr, C, H, W, WIDTH, PT, PL, LENGTH, SLOTS, sxn, sxh, sxw, sos, son, soc,
                           BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[s, n, c, f] = x[n, y, x, c] at the padded pixel f + s (y = (f + s) // WIDTH − PT,
    x = (f + s) % WIDTH − PL; zero off the image): each copy written once from the channels-last x."""
    pid_f, pid_c, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, s = pid // SLOTS, pid % SLOTS
    rf = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    y, x = (rf + s) // WIDTH - PT, (rf + s) % WIDTH - PL
    inside = (rf < LENGTH) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    v = tl.load(x_ptr + n.to(tl.int64) * sxn + (y * sxh + x * sxw)[:, None] + rc[None, :],
                mask=inside[:, None] & (rc[None, :] < C), other=0.0)
    out = out_ptr + s.to(tl.int64) * sos + n.to(tl.int64) * son
    tl.store(out + rc[None, :] * soc + rf[:, None], v, mask=(rf[:, None] < LENGTH) & (rc[None, :] < C))


class Tiles(NamedTuple):
    """One kernel's launch: tile edges along its rows, columns and reduction, warps, pipeline
    stages, and ``programs``: 0 for one program per tile, or (the responses and the
    back-projection, persistent) that many programs per multiprocessor, each looping over tiles;
    ``shifted`` (the filters): their patches read from shifted copies of the input
    (``shifted_operands``) instead of the channels-last input; ``tma`` (the responses and the
    back-projection): their operands copied by the tensor memory accelerator, the ``rows``
    positions (or pixels) a box of the output (or input, ``position_box``), where ``tma_fits``."""
    rows: int
    cols: int
    red: int
    warps: int
    stages: int
    programs: int = 0
    shifted: bool = False
    tma: bool = False


# An H100's shared memory per block (sm_90, 227 KiB): the measured tiles need up to 208 KiB there
H100_SHARED_MEMORY = 232448


def default_tiles(kernel: str, columns: int, dtype: torch.dtype, device: torch.device) -> Tiles:
    """A launch's tiles: ``kernel`` is "filters", "responses" (with the normalisation), "back", or
    the Gram path's "patch_gram" and "gram_back". GPUs: tensor-core tiles whose reduction tile
    holds 128 bytes of a row, the column tile no wider than the ``columns`` there are (VGG16's
    first layers have 64 channels); float64 and the CPU interpreter: small tiles. Chosen from
    benchmarks/bench_conv_products.py --tiles on an H100 (VGG16's dense layers, batch 64;
    docs/gpu/h100_conv_products_tiles.log, and each kernel's own time on the rule's launch in
    docs/gpu/h100_conv_products_tiles_session21.json): in bfloat16, 128×256 response tiles
    3–5 % faster than 256×128 where there are 256 section columns or more, and 64×128
    back-projection tiles of 4 warps 17–24 % faster than 128×128 of 8 where there are 128
    channels or more (its epilogue, the purge's 2·x̂⊙dx, hides behind other programs' products);
    in TF32, 256-row back-projection tiles 12–16 % faster where there are 128 channels or more.
    Session 26 (docs/gpu/h100_conv_products_session26.json, the kernel's own time on the rule's
    launch): persistent 128×256 response tiles (one program per multiprocessor) take 11–14 %
    less time in bfloat16 and 24–25 % in TF32 where there are 256 section columns or more; TF32
    filters from shifted copies of the input (``Tiles.shifted``) 1.5–1.9× faster, the whole call
    with the copies 7–11 % faster. (The Gram path's kernels keep the tiles they were measured with.)
    GPUs with less shared memory per block than an H100 get them fitted (``fitted_tiles``)."""
    if device.type != "cuda" or dtype == torch.float64:
        return Tiles(32, 32, 16 if device.type == "cuda" else 32, 4, 2)
    return tensor_core_tiles(kernel, columns, dtype, *_shared_memory(device))


def tensor_core_tiles(kernel: str, columns: int, dtype: torch.dtype, shared_memory: int = H100_SHARED_MEMORY,
                      major: int = 9) -> Tiles:
    """``default_tiles`` on a GPU of ``shared_memory`` bytes per block and that major capability
    (by default an H100's): those measured there, fitted to the device (``fitted_tiles``)."""
    return fitted_tiles(_measured_tiles(kernel, columns, dtype), dtype.itemsize, shared_memory, major,
                        staged=kernel in ("responses", "patch_gram"))


def _measured_tiles(kernel: str, columns: int, dtype: torch.dtype) -> Tiles:
    """The tensor-core tiles ``default_tiles`` describes, as measured on an H100."""
    red = 128 // (torch.finfo(dtype).bits // 8)
    cols = min(128, max(32, triton.next_power_of_2(columns)))
    wide, half = cols == 128, dtype.itemsize == 2
    if kernel == "responses" and columns >= 256:
        return Tiles(128, 256, red, 8, 3, programs=1)
    if kernel == "filters" and dtype == torch.float32 and columns >= 64:
        return Tiles(256 if wide else 128, 128, red, 8, 3, shifted=True)
    if kernel in ("responses", "patch_gram"):
        return Tiles(256, 128, red, 8, 3) if half else Tiles(128, 128, 2 * red, 8, 3)
    if kernel == "back" and half and wide:
        return Tiles(64, 128, red, 4, 3)
    if dtype == torch.float32 and wide:
        return Tiles(256, 128, red, 8, 3)
    return Tiles(128, cols, red, 8 if wide else 4, 3)


@functools.lru_cache
def _shared_memory(device: torch.device) -> tuple[int, int]:
    """The device's shared memory per block (opted in, as Triton launches) and its major capability."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block), props.major


def shared_memory_estimate(t: Tiles, itemsize: int, major: int, staged: bool) -> int:
    """Bytes of shared memory a launch of ``t`` takes at most: the operands' pipeline buffers
    (``stages`` of them on Hopper and Blackwell's data-centre GPUs, one fewer on the others, sm_120
    included, which Triton compiles as it does sm_80) and, ``staged`` (the responses, whose
    normalising epilogue passes its tile through shared memory), the output tile: in the buffers'
    place, or beside them where the launch is persistent (the next tile's loads are under way).
    What Triton 3.x compiles to, checked by compiling for sm_80, sm_86 and sm_90."""
    buffers = (t.stages if major in (9, 10) else t.stages - 1) * (t.rows + t.cols) * t.red * itemsize
    output = t.rows * t.cols * itemsize if staged else 0
    return buffers + output if t.programs else max(buffers, output)


def fitted_tiles(t: Tiles, itemsize: int, shared_memory: int, major: int, staged: bool) -> Tiles:
    """``t``, or where the device has less shared memory than the H100 the tiles were measured on
    (an A100: 163 KiB, sm_86/sm_89 and sm_120 GPUs: 99 KiB; Triton refuses a launch that needs more,
    and nothing else would run the layer), smaller tiles that fit: not persistent, then smaller
    row and column tiles while the output tile alone is too large, a shorter reduction tile (down
    to 64 bytes of a row), smaller row and column tiles, fewer stages."""
    if shared_memory >= H100_SHARED_MEMORY:
        return t
    while shared_memory_estimate(t, itemsize, major, staged) > shared_memory:
        halved = t._replace(rows=t.rows // 2) if t.rows >= t.cols else t._replace(cols=t.cols // 2)
        if t.programs:
            t = t._replace(programs=0)
        elif staged and t.rows * t.cols * itemsize > shared_memory:
            t = halved
        elif t.red * itemsize > 64:
            t = t._replace(red=t.red // 2)
        elif max(t.rows, t.cols) > 64:
            t = halved
        elif t.stages > 2:
            t = t._replace(stages=t.stages - 1)
        else:
            break
    return t


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(programs: int, positions: int, block: int, device: torch.device) -> int:
    """How many parts the filters' long sum over positions is cut into, so that the GPU has about
    two programs per multiprocessor (batch 1 has only taps × tiles of them)."""
    if device.type != "cuda":
        return 1
    wanted = -(-2 * _multiprocessors(device) // programs)
    return max(1, min(wanted, positions // (8 * block)))


# CUDA's limit on a launch's second and third grid dimensions, where the kernels put the samples
# (with the taps, for the filters)
MAX_GRID_YZ = GRID_YZ_LIMIT


def max_samples(kernel) -> int:
    """The most samples one call of ``conv_products_triton`` takes for a conv of ``kernel`` (kh, kw)."""
    return MAX_GRID_YZ // (kernel[0] * kernel[1])


class Combination(NamedTuple):
    """What the back-projection's epilogue writes instead of dx: x̂⊙dx with x̂ = max(x, 0)·scale
    (the layer's input as rules.base.rectified_input forms it) and, for the purge (``counts``
    given: (N,) int32 zeros), 2·x̂⊙dx with its non-zeros counted per sample into ``counts``."""
    x: torch.Tensor
    scale: torch.Tensor
    counts: torch.Tensor | None


def with_pixel_stride(t: torch.Tensor) -> torch.Tensor:
    """An (N, C, H, W) tensor whose pixels lie at one stride (NCHW or channels-last; any strides
    when H or W is 1): ``t``, or a contiguous copy of it."""
    one_line = t.shape[2] == 1 or t.shape[3] == 1
    return t if one_line or t.stride(2) == t.shape[3] * t.stride(3) else t.contiguous()


def _pixel_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Sample, channel and pixel strides of a ``with_pixel_stride`` tensor: a column's pixels
    (W = 1) lie at its row stride, which PyTorch's own contiguity ignores the width's stride for."""
    return t.stride(0), t.stride(1), t.stride(3) if t.shape[3] > 1 else t.stride(2)


def pack_input(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W, C) contiguous max(x, 0)·scale in ``dtype``, from x (N, C, H, W) in any layout."""
    N, C, H, W = x.shape
    x = with_pixel_stride(x)
    out = torch.empty((N, H, W, C), dtype=dtype, device=x.device)
    block_c, block_p = min(64, triton.next_power_of_2(C)), 64
    _pack_kernel[(triton.cdiv(H * W, block_p), triton.cdiv(C, block_c), N)](
        x, scale, out, C, H * W, *_pixel_strides(x), BLOCK_C=block_c, BLOCK_P=block_p)
    return out


def stack_sections(R: torch.Tensor, dtype: torch.dtype, align: int = 1, interleave: bool = False,
                   grid: tuple[int, int] | None = None) -> torch.Tensor:
    """[R⁺; R⁻] (N, 2·O, Lp) in ``dtype`` from R (N, O, L), in one pass over R, the positions
    zero-padded to Lp, the next multiple of ``align``; ``interleave``: rows R⁺ₒ, R⁻ₒ per output o;
    ``grid`` (Wo, width): R's positions, rows of Wo, laid on rows of ``width`` (zeros between)."""
    N, O, L = R.shape
    R = R.contiguous()
    Wo, width = grid or (1, 1)
    LP = triton.cdiv(L // Wo * width, align) * align
    out = torch.empty((N, 2 * O, LP), dtype=dtype, device=R.device)
    block = min(1024, triton.next_power_of_2(LP))
    _stack_kernel[(N * O, triton.cdiv(LP, block))](R, out, O, L, LP, Wo, width, BLOCK=block, INTERLEAVE=interleave,
                                                   ON_GRID=grid is not None)
    return out


class ShiftedOperands(NamedTuple):
    """The filters' operands on the padded input's grid (``Tiles.shifted``): the output's
    positions l = i·width + j (i < Ho, j < width, the padded input's width rounded up to
    ``align`` elements, 16 bytes; the columns j ≥ Wo hold zero sections), ``positions`` of them
    rounded up to a whole block; ``sections`` (N, 2·O, positions) interleaved; ``copies`` (slots,
    N, C, length): the rectified input, zero-padded and positions-major, slot s holding the
    padded pixel f + s at f, for each shift s = kx·dx mod ``align`` the taps need."""
    sections: torch.Tensor
    copies: torch.Tensor
    width: int
    positions: int
    align: int


def _shifted_layout(x_cl: torch.Tensor, kernel, dilation, pad, out_hw, block: int) -> tuple[int, int, int, int]:
    """``ShiftedOperands``' align, width and positions, and each copied channel's length."""
    W = x_cl.shape[2]
    (kh, kw), (dy, dx), (pl, pr, _, _) = kernel, dilation, pad
    align = 16 // x_cl.element_size()
    width = triton.cdiv(W + pl + pr, align) * align
    positions = triton.cdiv(out_hw[0] * width, block) * block
    reach = (kh - 1) * dy * width + (kw - 1) * dx  # where the last tap's rows start
    return align, width, positions, triton.cdiv(positions + reach, 16) * 16  # each channel's row starts aligned


def _offsets_fit(C: int, O: int, positions: int, length: int) -> bool:
    return max(C * length, 2 * O * positions) < 2**31


def shifted_fits(x_cl: torch.Tensor, O: int, kernel, dilation, pad, out_hw, block: int) -> bool:
    """Whether a sample's shifted copies and sections stay within the kernel's 32-bit offsets."""
    _, _, positions, length = _shifted_layout(x_cl, kernel, dilation, pad, out_hw, block)
    return _offsets_fit(x_cl.shape[3], O, positions, length)


def shifted_operands(x_cl: torch.Tensor, R: torch.Tensor, kernel, dilation, pad, out_hw, block: int) -> ShiftedOperands:
    """The filters' operands for a launch with ``Tiles.shifted`` (a stride-1 conv; x_cl and
    pad as ``conv_products_triton`` takes them, positions rounded up to ``block``). The copies
    cost the input's bytes once per slot (three for a 3×3 conv), each written in one pass: what
    lets TF32 tensor cores read the patches without the transposing 4-byte copies that the
    channels-last input needs."""
    N, H, W, C = x_cl.shape
    O = R.shape[1]
    kw, dx, (pl, pt), Wo = kernel[1], dilation[1], pad[::2], out_hw[1]
    align, width, positions, length = _shifted_layout(x_cl, kernel, dilation, pad, out_hw, block)
    if not _offsets_fit(C, O, positions, length):  # the kernel's offsets within a sample are 32-bit
        raise ValueError(f"shifted_operands: a sample's copy of {C}×{length} or sections of {2 * O}×{positions} "
                         "elements pass 32-bit offsets")
    sections = stack_sections(R, x_cl.dtype, align=block, interleave=True, grid=(Wo, width))
    slots = max(kx * dx % align for kx in range(kw)) + 1
    copies = x_cl.new_empty((slots, N, C, length))
    block_f, block_c = 64, min(64, triton.next_power_of_2(C))
    step = MAX_GRID_YZ // slots  # samples per launch: grid z is samples × slots
    for i in range(0, N, step):
        n = min(step, N - i)
        _shifted_copies_kernel[(triton.cdiv(length, block_f), triton.cdiv(C, block_c), n * slots)](
            x_cl[i:], copies[:, i:], C, H, W, width, pt, pl, length, slots, *x_cl.stride()[:3], *copies.stride()[:3],
            BLOCK_F=block_f, BLOCK_C=block_c)
    return ShiftedOperands(sections, copies, width, positions, align)


def position_box(rows: int, out_hw, min_width: int = 1) -> tuple[int, int]:
    """The box of output positions (height, width: powers of two, ``rows`` in all) that a TMA
    responses tile covers: the one whose boxes cover the output with the fewest positions past
    its edges, the widest of those; at least ``min_width`` wide where the width is a box's
    innermost axis (TMA reads 16 bytes and more of it)."""
    Ho, Wo = out_hw
    widths = [1 << k for k in range(rows.bit_length()) if min(min_width, rows) <= (1 << k) <= rows]
    width = min(widths, key=lambda w: (triton.cdiv(Ho, rows // w) * (rows // w) * triton.cdiv(Wo, w) * w, -w))
    return rows // width, width


def tma_fits(*operands: torch.Tensor) -> bool:
    """Whether tensor descriptors can address these operands: on a GPU with the tensor memory
    accelerator (compute capability 9 or later; Triton's interpreter on the CPU), each starting on
    16 bytes with its last axis contiguous and every other stride a multiple of 16 bytes."""
    device = operands[0].device
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in operands)


def _tma_refused(kernel: str, operands: str, device: torch.device) -> ValueError:
    """The error for a TMA launch (``Tiles.tma``) whose operands ``tma_fits`` turns down."""
    return ValueError(f"conv_products: TMA {kernel} (Tiles.tma) need 16-byte aligned operands and a GPU with the "
                      f"tensor memory accelerator; {operands} on {device} do not")


def _responses_tma_operands(x_cl: torch.Tensor, F: torch.Tensor, t: Tiles, out_hw) -> tuple:
    """The responses kernel's patches and filters arguments for a TMA launch: x (N, H, W, C) and
    F (N, T, M, C) as tensor descriptors of one box each (positions, section columns, channels), and
    the box's width."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not tma_fits(x_cl, F):
        raise _tma_refused("responses", f"{x_cl.shape[-1]} channels of {x_cl.dtype}", x_cl.device)
    height, width = position_box(t.rows, out_hw)
    return (TensorDescriptor.from_tensor(x_cl, [1, height, width, t.red]),
            TensorDescriptor.from_tensor(F, [1, 1, t.cols, t.red]), width)


def _row_tiles(t: Tiles, hw, box_w: int) -> int:
    """How many row tiles a launch has over a grid of hw positions (``_position_tiles``)."""
    if t.tma:
        return triton.cdiv(hw[0], t.rows // box_w) * triton.cdiv(hw[1], box_w)
    return triton.cdiv(hw[0] * hw[1], t.rows)


def _grid(t: Tiles, tiles: tuple[int, int, int], device: torch.device) -> tuple[int, ...]:
    """A launch's grid over (row blocks, column blocks, samples): one program per tile, or
    ``t.programs`` persistent programs per multiprocessor (on the CPU interpreter, in all), no
    more than there are tiles, each looping over them."""
    if not t.programs:
        return tiles
    per_device = t.programs * (_multiprocessors(device) if device.type == "cuda" else 1)
    return (max(1, min(tiles[0] * tiles[1] * tiles[2], per_device)),)


def _checked_flags(name: str, x_cl: torch.Tensor, R: torch.Tensor, out_hw, samples: int) -> dict:
    """The kernels' precision flags, once the operands are checked: x_cl (N, H, W, C) with
    contiguous channels, R (N, O, Ho·Wo), at most ``samples`` samples."""
    N = x_cl.shape[0]
    if x_cl.stride(-1) != 1 or R.dim() != 3 or R.shape[0] != N or R.shape[-1] != out_hw[0] * out_hw[1]:
        raise ValueError(f"{name}: x {tuple(x_cl.shape)}, R {tuple(R.shape)}, output {tuple(out_hw)} do not fit")
    if N > samples:
        raise ValueError(f"{name}: {N} samples, more than the {samples} one launch takes")
    dtype, device = x_cl.dtype, x_cl.device
    return dict(FP64=dtype == torch.float64,
                TF32=dtype == torch.float32 and device.type == "cuda" and matmul_tf32())


def conv_products_triton(x_cl: torch.Tensor, R: torch.Tensor, kernel, dilation, pad, out_hw, out_dtype: torch.dtype,
                         splits: int | None = None, tiles: dict[str, Tiles] | None = None,
                         combine: Combination | None = None) -> torch.Tensor:
    """RSP's back-projection F⁺ᵀS⁺ − F⁻ᵀS⁻ at the (unpadded) input of a stride-1, ungrouped conv.

    x_cl: (N, H, W, C) the rectified input, channels-last and contiguous, in the products'
    precision; R: (N, O, L) the relevance at the output (the filters read its sections stacked in
    the products' precision, the normalisation reads R in its own);
    pad = (left, right, top, bottom). ``splits``: how many parts the filters' sum over positions
    is cut into (default: enough programs for the GPU); ``tiles``: a kernel's ("filters",
    "responses", "back") launch instead of ``default_tiles``; ``combine``: the back-projection
    combined with the input (``Combination``). Returns dx, or what ``combine`` asks for, as
    (N, C, H, W) contiguous in ``out_dtype``."""
    N, H, W, C = x_cl.shape
    O, L = R.shape[1:]
    M = 2 * O
    (kh, kw), (dy, dx_), (pl, _, pt, _) = kernel, dilation, pad
    Wo = out_hw[1]
    flags = _checked_flags("conv_products", x_cl, R, out_hw, max_samples(kernel))
    T, dtype, device = kh * kw, x_cl.dtype, x_cl.device
    tiles = tiles or {}
    geometry = (H, W, Wo, kw, dy, dx_, pt, pl, T)
    x_strides = x_cl.stride()[:3]

    # filters: rows are the sections, columns the channels, reduced over positions
    t = tiles.get("filters") or default_tiles("filters", C, dtype, device)
    if t.shifted and "filters" not in tiles and not shifted_fits(x_cl, O, kernel, dilation, pad, out_hw, t.red):
        t = t._replace(shifted=False)  # the default launch, on the channels-last input where copies would not fit
    if t.programs:
        raise ValueError("conv_products: the filters kernel has no persistent launch (Tiles.programs)")
    F = (_filters_by_tma if t.tma else _filters_from_stacked_sections)(x_cl, R, t, kernel, dilation, pad, out_hw,
                                                                        splits, flags)  # N, T, M, C

    # responses and normalisation: rows are positions, columns the sections, reduced over (tap, channel)
    t = tiles.get("responses") or default_tiles("responses", M, dtype, device)
    S = torch.empty((N, L, M), dtype=dtype, device=device)
    patches, filters, box_w = _responses_tma_operands(x_cl, F, t, out_hw) if t.tma else (x_cl, F, 1)
    _responses_kernel[_grid(t, (_row_tiles(t, out_hw, box_w), triton.cdiv(M, t.cols), N), device)](
        patches, filters, R, S, N, O, C, L, *geometry, *x_strides, *F.stride()[:3], *R.stride(), *S.stride()[:2],
        BLOCK_L=t.rows, BLOCK_M=t.cols, BLOCK_C=t.red, **flags, GRAM=False, PERSISTENT=t.programs > 0, TMA=t.tma,
        BOX_W=box_w, num_warps=t.warps, num_stages=t.stages)

    # back-projection: rows are the input's pixels, columns its channels, reduced over (tap, section)
    return _back_projection(S, _filters_for_back(F, flags), x_cl, out_dtype, combine, tiles, flags, out_hw, kernel,
                            dilation, pad, gram=False)


def _filters_from_stacked_sections(x_cl, R, t: Tiles, kernel, dilation, pad, out_hw, splits, flags) -> torch.Tensor:
    """F (N, T, M, C) from R's sections stacked in the products' precision and the patches read
    from the channels-last input or (``Tiles.shifted``) its shifted copies. The stacked sections
    are written once (read from float32 R in the loop instead, VGG16's conv1_2 products took 8.5 ms
    per batch of 64 on an H100 instead of 5.5, likely because operands converted in registers miss
    the asynchronous copies to shared memory), their positions padded to a multiple of 16 with
    zeros: the JIT then knows the rows of Rs and the filters' loop bounds aligned, so 16-bit
    sections are copied asynchronously and the loop is pipelined (scripts/compile_kernels.py) also
    where L is not a multiple of 16 (14² = 196)."""
    N, H, W, C = x_cl.shape
    M, T = 2 * R.shape[1], kernel[0] * kernel[1]
    dtype, device = x_cl.dtype, x_cl.device
    geometry = (H, W, out_hw[1], kernel[1], *dilation, pad[2], pad[0], T)
    if t.shifted:
        sections, patches, width, _, align = shifted_operands(x_cl, R, kernel, dilation, pad, out_hw, t.red)
        patch_strides = (patches.stride(1), 0, 0, patches.stride(0), patches.stride(2))
    else:
        sections, patches, width, align = stack_sections(R, dtype, align=16, interleave=True), x_cl, 0, 1
        patch_strides = (*x_cl.stride()[:3], 0, 0)
    Lp = sections.shape[-1]
    blocks = triton.cdiv(M, t.rows) * triton.cdiv(C, t.cols)
    split = splits or _splits(blocks * N * T, Lp, t.red, device)
    per_split = triton.cdiv(triton.cdiv(Lp, split), t.red) * t.red
    split = triton.cdiv(Lp, per_split)
    F = torch.empty((split, N, T, M, C), dtype=torch.float32 if split > 1 and dtype != torch.float64 else dtype,
                    device=device)
    _filters_kernel[(triton.cdiv(M, t.rows), triton.cdiv(C, t.cols), N * T * split)](
        sections, patches, F, M, C, Lp, *geometry, split, per_split, width, *sections.stride(), *patch_strides,
        *F.stride()[:4], BLOCK_M=t.rows, BLOCK_C=t.cols, BLOCK_L=t.red, **flags, SHIFTED=t.shifted, ALIGN=align,
        num_warps=t.warps, num_stages=t.stages)
    del sections, patches  # the stacked sections and any shifted copies: free before S and the back-projection
    return F.sum(0).to(dtype) if split > 1 else F[0]


def _filters_by_tma(x_cl, R, t: Tiles, kernel, dilation, pad, out_hw, splits, flags) -> torch.Tensor:
    """F (N, T, M, C) by ``_filters_tma_kernel``: R and x read through tensor descriptors, R's
    sections formed in registers (``Tiles.tma``; ``t.red`` positions a box of the output)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    N, H, W, C = x_cl.shape
    O, T = R.shape[1], kernel[0] * kernel[1]
    R4 = R.contiguous().view(N, O, *out_hw)
    if not tma_fits(x_cl, R4):
        raise _tma_refused("filters", f"{C} channels of {x_cl.dtype} and an output {out_hw[1]} wide in {R.dtype}",
                           x_cl.device)
    height, width = position_box(t.red, out_hw, min_width=16 // R4.element_size())  # R's box: width innermost
    boxes = triton.cdiv(out_hw[0], height) * triton.cdiv(out_hw[1], width)
    blocks = triton.cdiv(2 * O, t.rows) * triton.cdiv(C, t.cols)
    split = splits or _splits(blocks * N * T, boxes * t.red, t.red, x_cl.device)
    per_split = triton.cdiv(boxes, split)
    split = triton.cdiv(boxes, per_split)
    dtype = x_cl.dtype
    F = torch.empty((split, N, T, 2 * O, C), dtype=torch.float32 if split > 1 and dtype != torch.float64 else dtype,
                    device=x_cl.device)
    (_, kw), (dy, dx), (pl, _, pt, _) = kernel, dilation, pad
    _filters_tma_kernel[(triton.cdiv(2 * O, t.rows), triton.cdiv(C, t.cols), N * T * split)](
        TensorDescriptor.from_tensor(R4, [1, t.rows // 2, height, width]),
        TensorDescriptor.from_tensor(x_cl, [1, height, width, t.cols]), F, O, C, *out_hw, kw, dy, dx, pt, pl, T,
        split, per_split, *F.stride()[:4], BLOCK_M=t.rows, BLOCK_C=t.cols, BLOCK_L=t.red, BOX_W=width, **flags,
        num_warps=t.warps, num_stages=t.stages)
    return F.sum(0).to(dtype) if split > 1 else F[0]


def _filters_for_back(F: torch.Tensor, flags: dict) -> torch.Tensor:
    """F (N, T, M, C) as the back-projection reads it, which sums over its sections M. TF32
    tensor cores take an operand from shared memory only with its summed axis contiguous there,
    and Triton copies a 32-bit one whose other axis is contiguous in memory (F's channels) 4
    bytes at a time, transposing (scripts/compile_kernels.py counts the copies); one pass makes
    a copy with the sections contiguous, which loads in 16-byte copies like the other operand.
    16-bit tensor cores transpose such an operand themselves: F as it is."""
    return F.transpose(2, 3).contiguous().transpose(2, 3) if flags["TF32"] else F


def _back_projection(S, F, x_cl, out_dtype, combine, tiles, flags, out_hw, kernel, dilation, pad, gram: bool):
    """The back kernel's launch: from S and F, or (``gram``) from Mᵀ in S's place and the patches."""
    N, H, W, C = x_cl.shape
    M = S.shape[-1]
    (_, kw), (dy, dx_), (pl, _, pt, _) = kernel, dilation, pad
    t = tiles.get("back") or default_tiles("gram_back" if gram else "back", C, x_cl.dtype, x_cl.device)
    if t.tma and gram:
        raise ValueError("gram_products: the Gram path's back-projection has no TMA launch (Tiles.tma)")
    dx = torch.empty((N, C, H, W), dtype=out_dtype, device=x_cl.device)
    if combine is not None:
        x = with_pixel_stride(combine.x)
        x_strides = _pixel_strides(x)
        scale, counts = combine.scale, combine.counts
    else:  # unread
        x, x_strides, scale, counts = dx, (0, 0, 0), dx, dx
    sections, filters, box_w, f_t = _back_tma_operands(S, F, t, out_hw, (H, W)) if t.tma else (S, F, 1, False)
    _back_kernel[_grid(t, (_row_tiles(t, (H, W), box_w), triton.cdiv(C, t.cols), N), x_cl.device)](
        sections, filters, x_cl, dx, x, scale, counts if counts is not None else dx, N, M, C, H, W, *out_hw, kw, dy,
        dx_, pt, pl, kernel[0] * kw, *S.stride()[:2], *(F.stride() if F.dim() == 4 else (0, 0, 0, 0)),
        *x_cl.stride()[:3], *dx.stride()[:2], *x_strides,
        BLOCK_Q=t.rows, BLOCK_C=t.cols, BLOCK_M=t.red, **flags, GRAM=gram, COMBINE=combine is not None,
        PURGE=combine is not None and counts is not None, PERSISTENT=t.programs > 0, TMA=t.tma, BOX_W=box_w,
        F_T=f_t, num_warps=t.warps, num_stages=t.stages)
    return dx


def _back_tma_operands(S: torch.Tensor, F: torch.Tensor, t: Tiles, out_hw, in_hw) -> tuple:
    """The back kernel's sections and filters arguments for a TMA launch: S (N, L, M) as a tensor
    descriptor of (N, Ho, Wo, M), F (N, T, M, C) as one of itself or, where its sections are the
    contiguous axis (``_filters_for_back``), of its transpose (N, T, C, M); the box's width, and
    whether F is given transposed."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    N, L, M = S.shape
    if S.stride(1) != M or S.stride(2) != 1 or not tma_fits(S, F if F.stride(-1) == 1 else F.transpose(2, 3)):
        raise _tma_refused("back-projections", f"{M} sections and {F.shape[-1]} channels of {S.dtype}", S.device)
    height, width = position_box(t.rows, in_hw)
    sections = TensorDescriptor.from_tensor(S.view(N, *out_hw, M), [1, height, width, t.red])
    f_t = F.stride(-1) != 1
    filters = TensorDescriptor.from_tensor(F.transpose(2, 3) if f_t else F, [1, 1, t.cols, t.red] if f_t
                                           else [1, 1, t.red, t.cols])
    return sections, filters, width, f_t


def gram_products_triton(x_cl: torch.Tensor, R: torch.Tensor, kernel, dilation, pad, out_hw, out_dtype: torch.dtype,
                         tiles: dict[str, Tiles] | None = None, combine: Combination | None = None) -> torch.Tensor:
    """The same back-projection (or ``combine``) as ``conv_products_triton``, by the Gram path:
    K = XᵤᵀXᵤ (L×L per sample) from the patches in place, S = [R⁺; R⁻]·K normalised (R read in
    its own precision), Mᵀ = SᵀRs, and dx gathered per input pixel from Xᵤ·M, again reading the
    patches in place. Fewer multiply-adds than the filters where positions are few (2·ck·L² +
    4·o·L² against 6·o·ck·L) and nothing unfolded or folded."""
    from .sectional_matmul import sectional_matmul_triton

    N, H, W, C = x_cl.shape
    O, L = R.shape[1:]
    (kh, kw), (dy, dx_), (pl, _, pt, _) = kernel, dilation, pad
    Wo = out_hw[1]
    flags = _checked_flags("gram_products", x_cl, R, out_hw, max_samples((1, 1)))
    dtype, device, tiles = x_cl.dtype, x_cl.device, tiles or {}
    # rows of Rs, K and Mᵀ padded to a multiple of 16 positions, so that 16-bit rows start aligned
    # (14² = 196 positions do not): their loads are then asynchronous copies
    Rs_low = stack_sections(R, dtype, align=16)  # N, 2·O, Lp (zeros past L)
    Lp = Rs_low.shape[-1]
    t = tiles.get("responses") or default_tiles("patch_gram", L, dtype, device)
    if t.tma:
        raise ValueError("gram_products: the patch Gram has no TMA launch (Tiles.tma)")
    K = torch.empty((N, L, Lp), dtype=dtype, device=device)[..., :L]
    _responses_kernel[_grid(t, (triton.cdiv(L, t.rows), triton.cdiv(L, t.cols), N), device)](
        x_cl, x_cl, R, K, N, O, C, L, H, W, Wo, kw, dy, dx_, pt, pl, kh * kw, *x_cl.stride()[:3], 0, 0, 0, *R.stride(),
        *K.stride()[:2], BLOCK_L=t.rows, BLOCK_M=t.cols, BLOCK_C=t.red, **flags, GRAM=True, PERSISTENT=t.programs > 0,
        TMA=False, BOX_W=1, num_warps=t.warps, num_stages=t.stages)
    S = sectional_matmul_triton(Rs_low[..., :L], K, stack_sections(R, R.dtype), O)  # N, 2·O, L: [S⁺; −S⁻]
    Mt = torch.bmm(S.transpose(1, 2).to(dtype), Rs_low)[..., :L]  # N, L, L: Mᵀ = Sᵀ·[R⁺; R⁻]
    return _back_projection(Mt, Mt, x_cl, out_dtype, combine, tiles, flags, out_hw, kernel, dilation, pad, gram=True)
