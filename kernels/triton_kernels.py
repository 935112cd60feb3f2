"""Triton kernels of the segmented multi-adapter ops, and their launchers.

The operands are the stacked form of `packing.py`: W entries (disjoint row ranges of one slot each), each with up
to J column slices of rank <= R, zero-padded to (W, J, R, K) / (W, J, N, R). The grid walks `tiles`
(entry, first row, end row; at most BLOCK_M rows), so rows of slot -1 cost nothing and every program uses one
adapter's weights (the SGMV layout of Punica / S-LoRA). Matmuls accumulate in fp32.

    shrink:  out[i, j*R + r] = act(x[i, in_col(w, j) + :K] @ down[w, j, r] + bias[w, j*R + r]) * scale[w]
    expand:  y[i, col(w, j) + n] += scale[w] * (h[i, j*R : (j+1)*R] @ up[w, j, n] + bias[w, n])
    lowrank: expand(act(shrink(x))) in one pass per tile (the rank-R intermediate stays in registers)
    outer:   out[w, j] += a[rows of w, a_col(w, j) + :P].T @ b[rows of w, b_col(w, j) + :Q]   (weight gradients)
    scale_shift: y[i, c, :] = y[i, c, :] * scale[w, c] + shift[w, c]

Rows i run over each entry's tiles; slices j >= nslices[w] are skipped. Ranks above MAX_BLOCK_R run in chunks of
MAX_BLOCK_R (a loop; `CHUNKED` is a constexpr so that the usual single chunk compiles without one, which spills
less), keeping the fp32 accumulators at 64 x 64 for any rank. Set `TRITON_INTERPRET=1` before the first launch to
run them on the CPU (tests).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3, "quick_gelu": 4}
BLOCK_M = 64  # rows per tile (packing.py splits segments with this)
MAX_BLOCK_R = 64  # ranks per chunk: a 64 x 64 fp32 accumulator is 32 registers a thread with 4 warps
NUM_WARPS = 4  # Triton's defaults, sized for the 64 x 64 tiles above
NUM_STAGES = 3
SCALE_SHIFT_ELEMENTS = 4096  # elements of y per scale_shift program and iteration (rows x element block)
SCALE_SHIFT_SPLIT = 8  # scale_shift programs per tile along its rows (each loops over BLOCK_M / 8 rows)
MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2


@triton.jit
def _activate(v, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 3:
        v = v * tl.sigmoid(v)
    elif ACT == 4:
        v = v * tl.sigmoid(1.702 * v)
    return v


@triton.jit
def _tile_rows(tiles_ptr, t, BLOCK_M: tl.constexpr):
    """Rows of tile `t` (int64, for offsets beyond 2**31 elements) and their mask."""
    start = tl.load(tiles_ptr + 3 * t + 1)
    end = tl.load(tiles_ptr + 3 * t + 2)
    rows = start + tl.arange(0, BLOCK_M)
    return rows.to(tl.int64), rows < end


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """`acc + a @ b`. PRECISION "ieee" keeps fp32 operands exact ("tf32" rounds them to 10 mantissa bits; 16-bit
    operands ignore it). A constexpr argument rather than two returns under a constexpr `if`, which some Triton
    versions compile both of."""
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _shrink_tile(
    x_ptr, w_ptr, rows, rmask, in_col, K, R, w, j, r0,
    sxm, sxk, sww, swj, swr, swk,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_R) fp32 = x[rows, in_col:in_col + K] @ w[w, j, r0:r0 + BLOCK_R].T (padded ranks and rows
    masked to 0)."""
    r = r0 + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    w_base = w_ptr + w.to(tl.int64) * sww + j * swj
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        xt = tl.load(x_ptr + rows[:, None] * sxm + (in_col + k)[None, :] * sxk, rmask[:, None] & kmask[None, :], 0.0)
        wt = tl.load(w_base + r[None, :] * swr + k[:, None] * swk, (r < R)[None, :] & kmask[:, None], 0.0)
        acc = _dot(xt, wt.to(xt.dtype), acc, PRECISION)
    return acc


@triton.jit
def _shrink_chunk(
    x_ptr, w_ptr, bias_ptr, scale_ptr, out_ptr, rows, rmask, in_col, K, R, J, w, j, r0,
    sxm, sxk, sww, swj, swr, swk, som, soc,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    acc = _shrink_tile(
        x_ptr, w_ptr, rows, rmask, in_col, K, R, w, j, r0,
        sxm, sxk, sww, swj, swr, swk, BLOCK_M, BLOCK_R, BLOCK_K, PRECISION,
    )  # fmt: skip
    r = r0 + tl.arange(0, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + w * J * R + j * R + r, r < R, 0.0).to(tl.float32)[None, :]
    acc = _activate(acc, ACT)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + w)
    tl.store(out_ptr + rows[:, None] * som + (j * R + r)[None, :] * soc, acc, rmask[:, None] & (r < R)[None, :])


@triton.jit
def _shrink_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, out_ptr, tiles_ptr, nslices_ptr, incol_ptr,
    K, R, J,
    sxm, sxk, sww, swj, swr, swk, som, soc,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    CHUNKED: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    j = tl.program_id(1)
    w = tl.load(tiles_ptr + 3 * t)
    if j >= tl.load(nslices_ptr + w):
        return
    rows, rmask = _tile_rows(tiles_ptr, t, BLOCK_M)
    in_col = tl.load(incol_ptr + w * J + j)
    if CHUNKED:
        for r0 in range(0, R, BLOCK_R):
            _shrink_chunk(
                x_ptr, w_ptr, bias_ptr, scale_ptr, out_ptr, rows, rmask, in_col, K, R, J, w, j, r0,
                sxm, sxk, sww, swj, swr, swk, som, soc,
                HAS_BIAS, HAS_SCALE, ACT, BLOCK_M, BLOCK_R, BLOCK_K, PRECISION,
            )  # fmt: skip
    else:
        _shrink_chunk(
            x_ptr, w_ptr, bias_ptr, scale_ptr, out_ptr, rows, rmask, in_col, K, R, J, w, j, 0,
            sxm, sxk, sww, swj, swr, swk, som, soc,
            HAS_BIAS, HAS_SCALE, ACT, BLOCK_M, BLOCK_R, BLOCK_K, PRECISION,
        )  # fmt: skip


@triton.jit
def _up_dot(
    h, w_ptr, w, j, n, nmask, r0, R, acc,
    sww, swj, swn, swr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + h @ w[w, j, n-block, r0:r0 + BLOCK_R].T (h: the (BLOCK_M, BLOCK_R) rank chunk starting at r0)."""
    r = r0 + tl.arange(0, BLOCK_R)
    wt = tl.load(
        w_ptr + w.to(tl.int64) * sww + j * swj + n[None, :] * swn + r[:, None] * swr,
        (r < R)[:, None] & nmask[None, :],
        0.0,
    )
    return _dot(h.to(wt.dtype), wt, acc, PRECISION)


@triton.jit
def _update_y(
    acc, bias_ptr, scale_ptr, y_ptr, rows, rmask, w, n, nmask, col, N, with_bias, sym, syn, HAS_BIAS: tl.constexpr
):
    """y[rows, col + n-block] += scale[w] * (acc + bias[w, n-block]) (the bias only where `with_bias`)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + w * N + n, nmask & with_bias, 0.0).to(tl.float32)[None, :]
    acc *= tl.load(scale_ptr + w)
    ptrs = y_ptr + rows[:, None] * sym + (col + n)[None, :] * syn
    mask = rmask[:, None] & nmask[None, :]
    old = tl.load(ptrs, mask, 0.0)
    tl.store(ptrs, (old.to(tl.float32) + acc).to(old.dtype), mask)


@triton.jit
def _expand_chunk(
    acc, h_ptr, w_ptr, rows, rmask, w, j, n, nmask, r0, R,
    shm, shc, sww, swj, swn, swr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    r = r0 + tl.arange(0, BLOCK_R)
    h = tl.load(h_ptr + rows[:, None] * shm + (j * R + r)[None, :] * shc, rmask[:, None] & (r < R)[None, :], 0.0)
    return _up_dot(h, w_ptr, w, j, n, nmask, r0, R, acc, sww, swj, swn, swr, BLOCK_R, PRECISION)


@triton.jit
def _expand_kernel(
    h_ptr, w_ptr, bias_ptr, scale_ptr, y_ptr, tiles_ptr, nslices_ptr, cols_ptr,
    N, R, J,
    shm, shc, sww, swj, swn, swr, sym, syn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, CHUNKED: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    j = tl.program_id(1)
    nb = tl.program_id(2)
    w = tl.load(tiles_ptr + 3 * t)
    if j >= tl.load(nslices_ptr + w):
        return
    rows, rmask = _tile_rows(tiles_ptr, t, BLOCK_M)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if CHUNKED:
        for r0 in range(0, R, BLOCK_R):
            acc = _expand_chunk(
                acc, h_ptr, w_ptr, rows, rmask, w, j, n, nmask, r0, R, shm, shc, sww, swj, swn, swr, BLOCK_R, PRECISION
            )
    else:
        acc = _expand_chunk(
            acc, h_ptr, w_ptr, rows, rmask, w, j, n, nmask, 0, R, shm, shc, sww, swj, swn, swr, BLOCK_R, PRECISION
        )
    col = tl.load(cols_ptr + w * J + j)
    _update_y(acc, bias_ptr, scale_ptr, y_ptr, rows, rmask, w, n, nmask, col, N, True, sym, syn, HAS_BIAS)


@triton.jit
def _lowrank_chunk(
    x_ptr, down_ptr, down_bias_ptr, up_ptr, up_bias_ptr, scale_ptr, y_ptr, rows, rmask, col, w, j, r0,
    K, N, R, J,
    sxm, sxk, sdw, sdj, sdr, sdk, suw, suj, sun, sur, sym, syn,
    HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """y[rows] += scale * (act(shrink of ranks r0:r0 + BLOCK_R) @ their up rows + (first chunk) up_bias)."""
    h = _shrink_tile(
        x_ptr, down_ptr, rows, rmask, 0, K, R, w, j, r0,
        sxm, sxk, sdw, sdj, sdr, sdk, BLOCK_M, BLOCK_R, BLOCK_K, PRECISION,
    )  # fmt: skip
    if HAS_DOWN_BIAS:
        r = r0 + tl.arange(0, BLOCK_R)
        h += tl.load(down_bias_ptr + w * J * R + j * R + r, r < R, 0.0).to(tl.float32)[None, :]
    h = _activate(h, ACT)
    for nb in range(0, tl.cdiv(N, BLOCK_N)):
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        acc = _up_dot(
            h, up_ptr, w, j, n, nmask, r0, R, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
            suw, suj, sun, sur, BLOCK_R, PRECISION,
        )  # fmt: skip
        _update_y(acc, up_bias_ptr, scale_ptr, y_ptr, rows, rmask, w, n, nmask, col, N, r0 == 0, sym, syn, HAS_UP_BIAS)


@triton.jit
def _lowrank_kernel(
    x_ptr, down_ptr, down_bias_ptr, up_ptr, up_bias_ptr, scale_ptr, y_ptr, tiles_ptr, nslices_ptr, cols_ptr,
    K, N, R, J,
    sxm, sxk, sdw, sdj, sdr, sdk, suw, suj, sun, sur, sym, syn,
    HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, CHUNKED: tl.constexpr,
):  # fmt: skip
    """Fused shrink -> act -> expand for one tile and slice: x rows read once and y rows updated once per rank
    chunk (once when R <= BLOCK_R; above, y is rounded to its dtype after each chunk)."""
    t = tl.program_id(0)
    j = tl.program_id(1)
    w = tl.load(tiles_ptr + 3 * t)
    if j >= tl.load(nslices_ptr + w):
        return
    rows, rmask = _tile_rows(tiles_ptr, t, BLOCK_M)
    col = tl.load(cols_ptr + w * J + j)
    if CHUNKED:
        for r0 in range(0, R, BLOCK_R):
            _lowrank_chunk(
                x_ptr, down_ptr, down_bias_ptr, up_ptr, up_bias_ptr, scale_ptr, y_ptr, rows, rmask, col, w, j, r0,
                K, N, R, J, sxm, sxk, sdw, sdj, sdr, sdk, suw, suj, sun, sur, sym, syn,
                HAS_DOWN_BIAS, HAS_UP_BIAS, ACT, BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_K, PRECISION,
            )  # fmt: skip
    else:
        _lowrank_chunk(
            x_ptr, down_ptr, down_bias_ptr, up_ptr, up_bias_ptr, scale_ptr, y_ptr, rows, rmask, col, w, j, 0,
            K, N, R, J, sxm, sxk, sdw, sdj, sdr, sdk, suw, suj, sun, sur, sym, syn,
            HAS_DOWN_BIAS, HAS_UP_BIAS, ACT, BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_K, PRECISION,
        )  # fmt: skip


@triton.jit
def _outer_kernel(
    a_ptr, b_ptr, out_ptr, tiles_ptr, nslices_ptr, acol_ptr, bcol_ptr,
    P, Q, J,
    sam, sac, sbm, sbc, sow, soj, sop, soq,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    j = tl.program_id(1)
    pq = tl.program_id(2)
    w = tl.load(tiles_ptr + 3 * t)
    if j >= tl.load(nslices_ptr + w):
        return
    rows, rmask = _tile_rows(tiles_ptr, t, BLOCK_M)
    nq = tl.cdiv(Q, BLOCK_Q)
    p = (pq // nq) * BLOCK_P + tl.arange(0, BLOCK_P)
    q = (pq % nq) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    acol = tl.load(acol_ptr + w * J + j)
    bcol = tl.load(bcol_ptr + w * J + j)
    at = tl.load(a_ptr + rows[:, None] * sam + (acol + p)[None, :] * sac, rmask[:, None] & (p < P)[None, :], 0.0)
    bt = tl.load(b_ptr + rows[:, None] * sbm + (bcol + q)[None, :] * sbc, rmask[:, None] & (q < Q)[None, :], 0.0)
    acc = _dot(
        tl.trans(at.to(tl.float32)), bt.to(tl.float32), tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32), PRECISION
    )
    ptrs = out_ptr + w.to(tl.int64) * sow + j * soj + p[:, None] * sop + q[None, :] * soq
    # the tiles of one entry add into the same block; no other memory is ordered by these adds: relaxed suffices
    tl.atomic_add(ptrs, acc, (p < P)[:, None] & (q < Q)[None, :], sem="relaxed")


@triton.jit
def _scale_shift_kernel(
    y_ptr, scale_ptr, shift_ptr, out_ptr, tiles_ptr, C, INNER,
    sym, syc, syi, som, soc, soi,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr,
    SPAN: tl.constexpr,
):  # fmt: skip
    """Element block `eb` of rows [g * SPAN, (g + 1) * SPAN) of tile `t`, ROWS rows at a time (a row is a token
    for 2-D y, a whole image for NCHW y: ROWS = 1 there)."""
    eb = tl.program_id(0)
    t = tl.program_id(1)
    g = tl.program_id(2)
    w = tl.load(tiles_ptr + 3 * t).to(tl.int64)
    lo = tl.load(tiles_ptr + 3 * t + 1) + g * SPAN
    hi = tl.minimum(tl.load(tiles_ptr + 3 * t + 2), lo + SPAN)
    e = eb * BLOCK_E + tl.arange(0, BLOCK_E)  # element of a row: channel e // INNER, position e % INNER
    c = e // INNER
    i = e % INNER
    emask = e < C * INNER
    if HAS_SCALE:
        scale = tl.load(scale_ptr + w * C + c, emask, 1.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + w * C + c, emask, 0.0).to(tl.float32)[None, :]
    for r0 in range(lo, hi, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        mask = (rows < hi)[:, None] & emask[None, :]
        rows = rows.to(tl.int64)
        v = tl.load(y_ptr + rows[:, None] * sym + (c * syc + i * syi)[None, :], mask, 0.0)
        acc = v.to(tl.float32)
        if HAS_SCALE:
            acc *= scale
        if HAS_SHIFT:
            acc += shift
        tl.store(out_ptr + rows[:, None] * som + (c * soc + i * soi)[None, :], acc.to(v.dtype), mask)


# --- launchers ----------------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    b = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(b, hi) if hi else b


def _precision(*tensors: torch.Tensor) -> str:
    """`"ieee"` when every operand is fp32 (TF32 would cost ~1e-3 relative), else Triton's default (ignored by 16-bit
    operands; an fp32 intermediate meeting 16-bit operands, as in `outer` for bf16 training, goes through TF32,
    which is finer than the 16-bit operand)."""
    return "ieee" if all(t.dtype == torch.float32 for t in tensors) else "tf32"


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on `t`'s GPU, not the current one (multi-GPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_contiguous(**tensors: torch.Tensor | None) -> None:
    """The kernels index these operands without strides."""
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")


def shrink(
    x: torch.Tensor,  # (M, >= in_col + K)
    down: torch.Tensor,  # (W, J, R, K)
    tiles: torch.Tensor,  # (T, 3) int32
    nslices: torch.Tensor,  # (W,) int32
    in_cols: torch.Tensor,  # (W, J) int32
    out: torch.Tensor,  # (M, J * R) fp32
    bias: torch.Tensor | None = None,  # (W, J * R)
    scale: torch.Tensor | None = None,  # (W,) fp32
    act: str = "identity",
    *,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    _, j, r, k = down.shape
    _check_contiguous(tiles=tiles, nslices=nslices, in_cols=in_cols, bias=bias, scale=scale)
    if tiles.shape[0]:
        with _on_device(out):
            _shrink_kernel[(tiles.shape[0], j)](
                x, down, bias if bias is not None else out, scale if scale is not None else out, out, tiles, nslices,
                in_cols, k, r, j, *x.stride(), *down.stride(), *out.stride(),
                HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, ACT=ACT_CODES[act],
                BLOCK_M=BLOCK_M, BLOCK_R=_pow2(r, hi=MAX_BLOCK_R), BLOCK_K=_pow2(k, hi=64),
                PRECISION=_precision(x, down), CHUNKED=r > MAX_BLOCK_R, num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
    return out


def expand(
    h: torch.Tensor,  # (M, J * R)
    up: torch.Tensor,  # (W, J, N, R)
    tiles: torch.Tensor,
    nslices: torch.Tensor,
    cols: torch.Tensor,  # (W, J) int32
    y: torch.Tensor,  # (M, >= col + N), updated in place
    scale: torch.Tensor,  # (W,) fp32
    bias: torch.Tensor | None = None,  # (W, N)
    *,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    _, j, n, r = up.shape
    _check_contiguous(tiles=tiles, nslices=nslices, cols=cols, scale=scale, bias=bias)
    block_n = _pow2(n, hi=64)
    if tiles.shape[0]:
        with _on_device(y):
            _expand_kernel[(tiles.shape[0], j, triton.cdiv(n, block_n))](
                h, up, bias if bias is not None else scale, scale, y, tiles, nslices, cols, n, r, j,
                *h.stride(), *up.stride(), *y.stride(),
                HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=_pow2(r, hi=MAX_BLOCK_R),
                PRECISION=_precision(up, y), CHUNKED=r > MAX_BLOCK_R, num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
    return y


def lowrank(
    x: torch.Tensor,  # (M, K)
    down: torch.Tensor,  # (W, J, R, K)
    up: torch.Tensor,  # (W, J, N, R)
    tiles: torch.Tensor,
    nslices: torch.Tensor,
    cols: torch.Tensor,
    y: torch.Tensor,  # updated in place; must not alias x
    scale: torch.Tensor,
    down_bias: torch.Tensor | None = None,  # (W, J * R)
    up_bias: torch.Tensor | None = None,  # (W, N)
    act: str = "identity",
    *,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Fused `expand(act(shrink(x)))`."""
    _, j, r, k = down.shape
    n = up.shape[2]
    _check_contiguous(tiles=tiles, nslices=nslices, cols=cols, scale=scale, down_bias=down_bias, up_bias=up_bias)
    if tiles.shape[0]:
        with _on_device(y):
            _lowrank_kernel[(tiles.shape[0], j)](
                x, down, down_bias if down_bias is not None else scale, up, up_bias if up_bias is not None else scale,
                scale, y, tiles, nslices, cols, k, n, r, j,
                *x.stride(), *down.stride(), *up.stride(), *y.stride(),
                HAS_DOWN_BIAS=down_bias is not None, HAS_UP_BIAS=up_bias is not None, ACT=ACT_CODES[act],
                BLOCK_M=BLOCK_M, BLOCK_N=_pow2(n, hi=64), BLOCK_R=_pow2(r, hi=MAX_BLOCK_R), BLOCK_K=_pow2(k, hi=64),
                PRECISION=_precision(x, down, y), CHUNKED=r > MAX_BLOCK_R, num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
    return y


def outer(
    a: torch.Tensor,  # (M, >= a_col + P)
    b: torch.Tensor,  # (M, >= b_col + Q)
    tiles: torch.Tensor,
    nslices: torch.Tensor,
    a_cols: torch.Tensor,  # (W, J) int32
    b_cols: torch.Tensor,  # (W, J) int32
    out: torch.Tensor,  # (W, J, P, Q) fp32, accumulated into
    *,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    _, j, p, q = out.shape
    _check_contiguous(tiles=tiles, nslices=nslices, a_cols=a_cols, b_cols=b_cols)
    block_p, block_q = _pow2(p, hi=64), _pow2(q, hi=64)
    if tiles.shape[0]:
        with _on_device(out):
            _outer_kernel[(tiles.shape[0], j, triton.cdiv(p, block_p) * triton.cdiv(q, block_q))](
                a, b, out, tiles, nslices, a_cols, b_cols, p, q, j, *a.stride(), *b.stride(), *out.stride(),
                BLOCK_M=BLOCK_M, BLOCK_P=block_p, BLOCK_Q=block_q, PRECISION=_precision(a, b),
                num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
    return out


def scale_shift(
    y: torch.Tensor,  # (M, C, INNER)
    scale: torch.Tensor | None,  # (W, C)
    shift: torch.Tensor | None,  # (W, C)
    tiles: torch.Tensor,
    out: torch.Tensor,  # (M, C, INNER); may be y
    *,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Grid: element blocks of a row on axis 0 (no limit that matters: an NCHW row is a whole image), tiles on axis
    1, SCALE_SHIFT_SPLIT row groups per tile on axis 2. Each program covers ~SCALE_SHIFT_ELEMENTS elements per
    iteration: several token rows for 2-D y, one image row at a time for NCHW."""
    _, c, inner = y.shape
    _check_contiguous(tiles=tiles, scale=scale, shift=shift)
    ref = scale if scale is not None else shift
    if tiles.shape[0] and ref is not None:
        if tiles.shape[0] > MAX_GRID_YZ:
            raise ValueError(f"scale_shift takes at most {MAX_GRID_YZ} tiles ({MAX_GRID_YZ * BLOCK_M} rows)")
        block_e = _pow2(c * inner, hi=SCALE_SHIFT_ELEMENTS)
        rows = min(BLOCK_M, SCALE_SHIFT_ELEMENTS // block_e)
        split = max(1, min(SCALE_SHIFT_SPLIT, BLOCK_M // rows))
        with _on_device(out):
            _scale_shift_kernel[(triton.cdiv(c * inner, block_e), tiles.shape[0], split)](
                y, scale if scale is not None else ref, shift if shift is not None else ref, out, tiles, c, inner,
                *y.stride(), *out.stride(),
                HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, BLOCK_E=block_e, ROWS=rows,
                SPAN=BLOCK_M // split, num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
    return out
