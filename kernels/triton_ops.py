"""The Triton path: segments packed into stacked operands, run as torch custom ops with autograd.

`multitask_peft::lowrank` (LoRA and bottleneck adapters) and `multitask_peft::scale_shift` are out-of-place ops
with a registered backward that runs the same segmented kernels (input gradients through shrink / expand, weight
gradients through the segmented `outer` kernel, bias gradients as segmented sums), and a fake implementation,
so `torch.compile` traces around them. The in-place `*_` forms are for inference (no autograd).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import packing
from .packing import LowRankPack, PackCache, ScaleShiftPack
from .segmented import ACTIVATIONS, BottleneckSegment, LoRASegment, ScaleShiftSegment

# triton_kernels imports triton, which decides at import time whether to interpret (TRITON_INTERPRET=1)
_tk = None


def _kernels():  # noqa: ANN202
    global _tk
    if _tk is None:
        from . import triton_kernels

        _tk = triton_kernels
    return _tk


POISON = False  # tests: fill scratch buffers with NaN so that a read of an element no kernel wrote shows up


def _scratch(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """(rows, cols) fp32 buffer whose in-tile elements the next kernel writes before anything reads them."""
    if POISON:
        return torch.full((rows, cols), float("nan"), device=device, dtype=torch.float32)
    return torch.empty(rows, cols, device=device, dtype=torch.float32)


def _act_derivative(act: str, v: torch.Tensor) -> torch.Tensor | float:
    """d act(v) / dv, elementwise."""
    if act == "identity":
        return 1.0
    if act == "relu":
        return (v > 0).to(v.dtype)
    if act == "gelu":  # Phi(v) + v phi(v)
        return 0.5 * (1.0 + torch.erf(v * 0.7071067811865476)) + v * torch.exp(-0.5 * v * v) * 0.3989422804014327
    k = 1.702 if act == "quick_gelu" else 1.0  # v * sigmoid(k v)
    sig = torch.sigmoid(k * v)
    return sig * (1.0 + k * v * (1.0 - sig))


def _slice_offsets(nslices: torch.Tensor, j: int, r: int) -> torch.Tensor:
    """(W, J) int32: j * r (the first column of slice j in a (rows, J * r) intermediate)."""
    return (torch.arange(j, device=nslices.device, dtype=torch.int32) * r).expand(nslices.shape[0], j).contiguous()


# --- low-rank (LoRA, bottleneck adapters) ---------------------------------------------------------------------------


@torch.library.custom_op("multitask_peft::lowrank", mutates_args=())
def lowrank_op(
    y: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    cols: torch.Tensor,
    nslices: torch.Tensor,
    scale: torch.Tensor,
    tiles: torch.Tensor,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(y + delta, pre)`: delta on each entry's rows and columns; `pre` (rows, J * R) fp32, the pre-activation."""
    tk = _kernels()
    _, j, r, _ = down.shape
    pre = torch.zeros(y.shape[0], j * r, device=y.device, dtype=torch.float32)
    tk.shrink(x, down, tiles, nslices, torch.zeros_like(cols), pre, bias=down_bias)
    out = y.clone()
    tk.expand(ACTIVATIONS[act](pre), up, tiles, nslices, cols, out, scale, bias=up_bias)
    return out, pre


@lowrank_op.register_fake
def _(y, x, down, up, down_bias, up_bias, cols, nslices, scale, tiles, act):  # noqa: ANN001, ANN202
    return torch.empty_like(y), y.new_empty(y.shape[0], down.shape[1] * down.shape[2], dtype=torch.float32)


def _lowrank_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    y, x, down, up, down_bias, up_bias, cols, nslices, scale, tiles, act = inputs
    ctx.act, ctx.has_bias = act, down_bias is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, down, up, cols, nslices, scale, tiles, output[1])


@torch.library.custom_op("multitask_peft::lowrank_backward", mutates_args=())
def lowrank_backward_op(
    g: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    cols: torch.Tensor,
    nslices: torch.Tensor,
    scale: torch.Tensor,
    tiles: torch.Tensor,
    pre: torch.Tensor,
    act: str,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `lowrank` w.r.t. x, down, up, down_bias, up_bias (the biases' empty without biases)."""
    tk = _kernels()
    g = g.contiguous()
    w, j, r, k = down.shape
    n = up.shape[2]
    zero_cols = torch.zeros_like(cols)
    # d(act input) = scale * g[:, col_j : col_j + N] @ up_j, then through the activation
    dh = torch.zeros_like(pre)
    tk.shrink(g, up.transpose(-1, -2), tiles, nslices, cols, dh, scale=scale)
    h, dpre = ACTIVATIONS[act](pre), dh * _act_derivative(act, pre)
    # dx = dpre @ down, every slice at once: down viewed as (W, 1, K, J * R)
    dx = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    down_t = down.reshape(w, 1, j * r, k).transpose(-1, -2)
    tk.expand(dpre, down_t, tiles, torch.ones_like(nslices), zero_cols[:, :1].contiguous(), dx, torch.ones_like(scale))
    offsets = _slice_offsets(nslices, j, r)
    d_down = tk.outer(
        dpre, x, tiles, nslices, offsets, zero_cols, torch.zeros(w, j, r, k, device=x.device, dtype=torch.float32)
    )
    d_up = tk.outer(g, h, tiles, nslices, cols, offsets, torch.zeros(w, j, n, r, device=x.device, dtype=torch.float32))
    d_up *= scale[:, None, None, None]
    d_down_bias, d_up_bias = down.new_empty(0), up.new_empty(0)
    if has_bias:
        row_entry = _row_entry(tiles, g.shape[0], w)
        d_down_bias = _segment_sum(dpre, row_entry, w).to(down.dtype)
        d_up_bias = (_segment_sum(g.float(), row_entry, w) * scale[:, None]).to(up.dtype)
    return dx.to(x.dtype), d_down.to(down.dtype), d_up.to(up.dtype), d_down_bias, d_up_bias


@lowrank_backward_op.register_fake
def _(g, x, down, up, cols, nslices, scale, tiles, pre, act, has_bias):  # noqa: ANN001, ANN202
    w, j, r, _ = down.shape
    biases = (down.new_empty(w, r), up.new_empty(w, up.shape[2])) if has_bias else (down.new_empty(0),) * 2
    return torch.empty_like(x), torch.empty_like(down), torch.empty_like(up), *biases


def _lowrank_backward(ctx, grad_out, _grad_pre):  # noqa: ANN001, ANN202
    x, down, up, cols, nslices, scale, tiles, pre = ctx.saved_tensors
    dx, d_down, d_up, d_down_bias, d_up_bias = lowrank_backward_op(
        grad_out, x, down, up, cols, nslices, scale, tiles, pre, ctx.act, ctx.has_bias
    )
    if not ctx.has_bias:
        d_down_bias = d_up_bias = None
    return grad_out, dx, d_down, d_up, d_down_bias, d_up_bias, None, None, None, None, None


lowrank_op.register_autograd(_lowrank_backward, setup_context=_lowrank_setup)


@torch.library.custom_op("multitask_peft::lowrank_", mutates_args=("y",))
def lowrank_inplace_op(
    y: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    cols: torch.Tensor,
    nslices: torch.Tensor,
    scale: torch.Tensor,
    tiles: torch.Tensor,
    act: str,
    fused: bool,
) -> None:
    """In place: `y += delta`. `fused` runs shrink -> act -> expand in one kernel (x must not alias y)."""
    tk = _kernels()
    if fused:
        tk.lowrank(x, down, up, tiles, nslices, cols, y, scale, down_bias, up_bias, act)
        return
    _, j, r, _ = down.shape
    h = _scratch(y.shape[0], j * r, y.device)
    tk.shrink(x, down, tiles, nslices, torch.zeros_like(cols), h, bias=down_bias, act=act)
    tk.expand(h, up, tiles, nslices, cols, y, scale, bias=up_bias)


@lowrank_inplace_op.register_fake
def _(y, x, down, up, down_bias, up_bias, cols, nslices, scale, tiles, act, fused):  # noqa: ANN001, ANN202
    return None


# --- scale / shift ------------------------------------------------------------------------------------------------


@torch.library.custom_op("multitask_peft::scale_shift", mutates_args=())
def scale_shift_op(
    y: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, tiles: torch.Tensor
) -> torch.Tensor:
    """`y` (rows, C, inner) with each entry's rows scaled and shifted per channel."""
    out = y.clone()
    _kernels().scale_shift(y, scale, shift, tiles, out)
    return out


@scale_shift_op.register_fake
def _(y, scale, shift, tiles):  # noqa: ANN001, ANN202
    return torch.empty_like(y)


def _scale_shift_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    y, scale, shift, tiles = inputs
    ctx.has_scale, ctx.has_shift = scale is not None, shift is not None
    ctx.save_for_backward(y, scale, tiles)
    ctx.entries = (scale if scale is not None else shift).shape[0]


@torch.library.custom_op("multitask_peft::scale_shift_backward", mutates_args=())
def scale_shift_backward_op(
    g: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None, tiles: torch.Tensor, entries: int, has_shift: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `scale_shift` w.r.t. y, scale, shift (empty where the forward had none)."""
    g = g.contiguous()
    row_entry = _row_entry(tiles, g.shape[0], entries)
    dy, d_scale, d_shift = g.clone(), g.new_empty(0), g.new_empty(0)
    if scale is not None:
        _kernels().scale_shift(g, scale, None, tiles, dy)
        d_scale = _segment_sum((g * y).float().sum(-1), row_entry, entries).to(scale.dtype)
    if has_shift:
        d_shift = _segment_sum(g.float().sum(-1), row_entry, entries).to(g.dtype)
    return dy, d_scale, d_shift


@scale_shift_backward_op.register_fake
def _(g, y, scale, tiles, entries, has_shift):  # noqa: ANN001, ANN202
    channels = (entries, g.shape[1])
    d_scale = g.new_empty(channels) if scale is not None else g.new_empty(0)
    return torch.empty_like(g), d_scale, g.new_empty(channels) if has_shift else g.new_empty(0)


def _scale_shift_backward(ctx, g):  # noqa: ANN001, ANN202
    y, scale, tiles = ctx.saved_tensors
    dy, d_scale, d_shift = scale_shift_backward_op(g, y, scale, tiles, ctx.entries, ctx.has_shift)
    return dy, d_scale if ctx.has_scale else None, d_shift if ctx.has_shift else None, None


scale_shift_op.register_autograd(_scale_shift_backward, setup_context=_scale_shift_setup)


@torch.library.custom_op("multitask_peft::scale_shift_", mutates_args=("y",))
def scale_shift_inplace_op(
    y: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, tiles: torch.Tensor
) -> None:
    _kernels().scale_shift(y, scale, shift, tiles, y)


@scale_shift_inplace_op.register_fake
def _(y, scale, shift, tiles):  # noqa: ANN001, ANN202
    return None


def _row_entry(tiles: torch.Tensor, rows: int, entries: int) -> torch.Tensor:
    """(rows,) entry of each row, `entries` for rows of none. Built on the device without a host sync: every tile
    spans at most BLOCK_M rows, so a fixed (T, BLOCK_M) grid of candidate rows is scattered, the ones past a tile's
    end into a spare last element (a `repeat_interleave` over the tile lengths would read its size on the host)."""
    t = tiles.long()
    candidates = t[:, 1:2] + torch.arange(packing.BLOCK_M, device=t.device)
    inside = candidates < t[:, 2:3]
    index = torch.where(inside, candidates, rows)
    values = torch.where(inside, t[:, :1], entries)
    out = torch.full((rows + 1,), entries, dtype=torch.long, device=t.device)
    return out.scatter_(0, index.flatten(), values.flatten())[:rows]


def _segment_sum(v: torch.Tensor, row_entry: torch.Tensor, entries: int) -> torch.Tensor:
    """(entries, ...) sums of the rows of `v` per entry."""
    out = v.new_zeros(entries + 1, *v.shape[1:])
    return out.index_add_(0, row_entry, v)[:entries]


# --- public forms -------------------------------------------------------------------------------------------------

FUSE_MIN_TILES = 128  # fused low-rank kernel once the grid has this many tiles (else shrink + expand: more programs)


def _lowrank(
    y: torch.Tensor, x: torch.Tensor, packs: Sequence[LowRankPack], inplace: bool, cache: PackCache | None
) -> torch.Tensor:
    for pack in packs:
        tiles = packing.tiles_for(pack.ranges, y.device, cache, pack.entries)
        args = (pack.down, pack.up, pack.down_bias, pack.up_bias)
        xc = x.to(y.dtype)
        if inplace:
            fused = tiles.shape[0] >= FUSE_MIN_TILES and not _shares_storage(xc, y)
            lowrank_inplace_op(y, xc, *args, pack.cols, pack.nslices, pack.scale, tiles, pack.act, fused)
        else:
            y, _ = lowrank_op(y, xc, *args, pack.cols, pack.nslices, pack.scale, tiles, pack.act)
    return y


def lora_(
    y: torch.Tensor, x: torch.Tensor, segments: Sequence[LoRASegment], cache: PackCache | None = None
) -> torch.Tensor:
    return _lowrank(y, x, packing.pack_lora(segments, y.dtype, cache), True, cache)


def lora(
    y: torch.Tensor, x: torch.Tensor, segments: Sequence[LoRASegment], cache: PackCache | None = None
) -> torch.Tensor:
    return _lowrank(y, x, packing.pack_lora(segments, y.dtype, cache), False, cache)


def bottleneck_(
    y: torch.Tensor, z: torch.Tensor, segments: Sequence[BottleneckSegment], cache: PackCache | None = None
) -> torch.Tensor:
    sequential = _shares_storage(y, z)  # z is y: each launch reads the rows as the previous launches left them
    for pack in packing.pack_bottleneck(segments, y.dtype, cache):
        _lowrank(y, y.clone() if sequential else z, [pack], True, cache)  # (kernels must not read rows they write)
    return y


def bottleneck(
    y: torch.Tensor, z: torch.Tensor, segments: Sequence[BottleneckSegment], cache: PackCache | None = None
) -> torch.Tensor:
    sequential = _shares_storage(y, z)
    for pack in packing.pack_bottleneck(segments, y.dtype, cache):
        y = _lowrank(y, y if sequential else z, [pack], False, cache)
    return y


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _scale_shift(
    y: torch.Tensor, packs: Sequence[ScaleShiftPack], inplace: bool, cache: PackCache | None
) -> torch.Tensor:
    y3 = y if y.ndim == 3 else y.unsqueeze(-1)
    for pack in packs:
        tiles = packing.tiles_for(pack.ranges, y3.device, cache, pack.entries)
        scale, shift = pack.scale, pack.shift
        if inplace:
            scale_shift_inplace_op(y3, scale, shift, tiles)
        else:
            y3 = scale_shift_op(y3, scale, shift, tiles)
    return y3.view(y.shape)


def scale_shift_(
    y: torch.Tensor, segments: Sequence[ScaleShiftSegment], cache: PackCache | None = None
) -> torch.Tensor:
    return _scale_shift(y, packing.pack_scale_shift(segments, y.dtype, cache), True, cache)


def scale_shift(y: torch.Tensor, segments: Sequence[ScaleShiftSegment], cache: PackCache | None = None) -> torch.Tensor:
    return _scale_shift(y, packing.pack_scale_shift(segments, y.dtype, cache), False, cache)
