"""The Triton kernels on a GPU at ViT-B sizes: every path against an fp64 reference (`pytest -m gpu`, ~60 s).

Each check is a helper taking the device and sizes; test_kernels.py runs the same helpers at small sizes in Triton's
interpreter, so a mistake in them shows on the CPU and not first on the GPU. Every test here is marked `gpu` and
skips (conftest) without CUDA.

Errors are max |got - ref| / max |ref| over the rows an adapter covers, against fp64 computed from the same
rounded inputs (so only the arithmetic of the path is measured, not the rounding of its inputs):

- fp32: IEEE dots with fp32 accumulation over K <= 3072 terms: ~sqrt(K) * 2**-24 ~ 3e-6 < 1e-5.
- fp16 / bf16: the rank-r intermediate is rounded to the 16-bit dtype before the up-projection, and the output
  once more: two roundings of at most 2**-11 (fp16) / 2**-8 (bf16) of the largest magnitude, plus fp32
  accumulation: < 3e-3 / 1e-2.
- Gradients sum over up to all rows of a slot (12608): fp32 < 1e-4; 16-bit < 3e-2 (the upstream gradient, dx and
  the weight gradients are each rounded to the 16-bit dtype, and `outer` multiplies the fp32 intermediate in TF32).

Rows of no adapter (slot -1) must come back bitwise unchanged on every path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from multitask_peft import kernels
from multitask_peft.kernels import BottleneckSegment, LoRASegment, ScaleShiftSegment, segmented

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}
PATHS = ("fused", "unfused", "torch")
IMAGES, TOKENS = 64, 197  # a ViT-B/16 batch at 224 px: M = 12608 rows
VIT_B = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # qkv, proj, fc1, fc2
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# --- helpers (device-agnostic; test_kernels.py runs them in the interpreter) -----------------------------------


@contextmanager
def kernel_path(monkeypatch: pytest.MonkeyPatch, path: str) -> Iterator[None]:
    """Run the ops on `path`: the Triton kernels fused or unfused (NaN-poisoned scratch), or the torch path."""
    from multitask_peft.kernels import triton_ops

    with monkeypatch.context() as m:
        m.setenv("MULTITASK_PEFT_KERNELS", "torch" if path == "torch" else "triton")
        m.setattr(triton_ops, "FUSE_MIN_TILES", 0 if path == "fused" else 1 << 30)
        m.setattr(triton_ops, "POISON", True)
        yield


def runs(images: int, tokens: int, slots: int) -> list[tuple[int, int, int]]:
    """(start, end, slot) row runs of a slot-sorted batch of `images` images of `tokens` rows, rotated so that the
    images of slot -1 (no adapter) sit mid-batch; slot -1 runs are left out."""
    order = sorted(i % (slots + 1) - 1 for i in range(images))
    order = order[images // 2 :] + order[: images // 2]
    out: list[tuple[int, int, int]] = []
    for i, s in enumerate(order):
        if out and out[-1][2] == s and out[-1][1] == i * tokens:
            out[-1] = (out[-1][0], (i + 1) * tokens, s)
        else:
            out.append((i * tokens, (i + 1) * tokens, s))
    return [r for r in out if r[2] >= 0]


def covered(rows: int, segments: list, device: torch.device | str) -> torch.Tensor:
    mask = torch.zeros(rows, dtype=torch.bool, device=device)
    for s in segments:
        mask[s.start : s.end] = True
    return mask


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _randn(shape: tuple[int, ...], g: torch.Generator, device: torch.device | str, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std).to(device)


def lora_case(
    rows: int, k: int, n: int, row_runs: list, ranks: list[int], dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[LoRASegment]]:
    """x, y and segments in `dtype` (slot s of a run gets factors of rank ranks[s % len(ranks)]); delta ~ y."""
    g = torch.Generator().manual_seed(seed)
    x, y = _randn((rows, k), g, device).to(dtype), _randn((rows, n), g, device).to(dtype)
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    segs = []
    for start, end, s in row_runs:
        if s not in factors:
            r = ranks[s % len(ranks)]
            factors[s] = (_randn((r, k), g, device, k**-0.5).to(dtype), _randn((n, r), g, device, r**-0.5).to(dtype))
        segs.append(LoRASegment(start, end, *factors[s], 0.5 + s % 3))
    return x, y, segs


def _double(segs: list) -> list:
    """The segments with every tensor in fp64 (the reference)."""
    return [type(s)(*(f.double() if isinstance(f, torch.Tensor) else f for f in vars(s).values())) for s in segs]


def check_lora(
    monkeypatch: pytest.MonkeyPatch, x: torch.Tensor, y: torch.Tensor, segs: list, paths: tuple[str, ...] = PATHS
) -> dict[str, float]:
    """`lora_` on each path against fp64; rows of no segment bitwise unchanged. Returns the errors."""
    ref = segmented.lora_(y.double(), x.double(), _double(segs))
    mask = covered(y.shape[0], segs, y.device)
    errors = {}
    for path in paths:
        with kernel_path(monkeypatch, path), torch.no_grad():
            got = kernels.lora_(y.clone(), x, segs)
        errors[path] = rel_err(got[mask], ref[mask])
        assert errors[path] < TOL[y.dtype], (path, errors[path])
        assert torch.equal(got[~mask], y[~mask]), path
    return errors


def check_lora_grads(monkeypatch: pytest.MonkeyPatch, x: torch.Tensor, y: torch.Tensor, segs: list) -> None:
    """Gradients of the differentiable `lora` (Triton) w.r.t. y, x and every factor, against the torch segmented path
    in fp64 (and the torch path in the same dtype meets the same tolerance)."""

    def grads(path: str, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.detach().to(dtype).requires_grad_() for t in (y, x, *(f for s in segs for f in _factors(s)))]
        mapped = [
            LoRASegment(s.start, s.end, *leaves[2 + 2 * i : 4 + 2 * i], s.scale, s.col) for i, s in enumerate(segs)
        ]
        with kernel_path(monkeypatch, path):
            out = kernels.lora(leaves[0], leaves[1], mapped)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
        return list(torch.autograd.grad((out * w).sum(), leaves))

    ref = grads("torch", torch.float64)
    for path in ("unfused", "torch"):  # the backward has one form: its kernels do not depend on FUSE_MIN_TILES
        for i, (a, b) in enumerate(zip(grads(path, y.dtype), ref, strict=True)):
            err = rel_err(a, b)
            assert err < GRAD_TOL[y.dtype], (path, i, err)


def _factors(seg: LoRASegment) -> tuple[torch.Tensor, torch.Tensor]:
    return seg.lora_a, seg.lora_b


def check_ranks(monkeypatch: pytest.MonkeyPatch, rows: int, k: int, n: int, ranks: list[int], dtype: torch.dtype,
                device: str) -> None:  # fmt: skip
    """Each rank alone on the Triton paths (ranks above 64 run in chunks), then all of them padded in one launch."""
    row_runs = runs(4, rows // 4, 3)
    for r in ranks:
        check_lora(
            monkeypatch, *lora_case(rows, k, n, row_runs, [r], dtype, device, seed=r), paths=("fused", "unfused")
        )
    check_lora(monkeypatch, *lora_case(rows, k, n, row_runs, ranks, dtype, device), paths=("fused", "unfused"))


def bottleneck_case(
    rows: int, channels: int, row_runs: list, dim: int, act: str, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, list[BottleneckSegment]]:
    g = torch.Generator().manual_seed(dim)
    z, y = _randn((rows, channels), g, device).to(dtype), _randn((rows, channels), g, device).to(dtype)
    segs = []
    for start, end, s in row_runs:
        d = dim - s % 3  # mixed widths: zero-padded in one launch
        parts = [
            _randn((d, channels), g, device, channels**-0.5),
            _randn((d,), g, device),
            _randn((channels, d), g, device, d**-0.5),
            _randn((channels,), g, device),
        ]
        segs.append(BottleneckSegment(start, end, *(p.to(dtype) for p in parts), act, 0.5 + s % 3))
    return z, y, segs


def check_bottleneck(
    monkeypatch: pytest.MonkeyPatch, z: torch.Tensor, y: torch.Tensor, segs: list, sequential: bool
) -> None:
    """In place (fused and unfused) and differentiable (gradients w.r.t. y, z and every weight), Triton against fp64
    torch."""
    mask = covered(y.shape[0], segs, y.device)
    y64 = y.double()
    ref = segmented.bottleneck_(y64, y64 if sequential else z.double(), _double(segs))
    for path in ("fused", "unfused"):
        with kernel_path(monkeypatch, path), torch.no_grad():
            out = y.clone()
            got = kernels.bottleneck_(out, out if sequential else z, segs)
        assert rel_err(got[mask], ref[mask]) < TOL[y.dtype], path
        assert torch.equal(got[~mask], y[~mask]), path

    def grads(path: str, dtype: torch.dtype) -> list[torch.Tensor]:
        params = [t.detach().to(dtype).requires_grad_() for s in segs for t in (s.down, s.down_bias, s.up, s.up_bias)]
        yy, zz = y.detach().to(dtype).requires_grad_(), z.detach().to(dtype).requires_grad_()
        mapped = [
            BottleneckSegment(s.start, s.end, *params[4 * i : 4 * i + 4], s.act, s.scale) for i, s in enumerate(segs)
        ]
        with kernel_path(monkeypatch, path):
            out = kernels.bottleneck(yy, yy if sequential else zz, mapped)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
        return list(torch.autograd.grad((out * w).sum(), [yy, zz, *params], allow_unused=True))

    ref_grads = grads("torch", torch.float64)
    for i, (a, b) in enumerate(zip(grads("unfused", y.dtype), ref_grads, strict=True)):
        if b is None:  # z unused by a sequential adapter
            assert a is None or not a.any(), i
            continue
        assert rel_err(a, b) < GRAD_TOL[y.dtype], (i, rel_err(a, b))


def scale_shift_case(
    shape: tuple[int, ...], row_runs: list, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, list[ScaleShiftSegment]]:
    g = torch.Generator().manual_seed(shape[0])
    y = _randn(shape, g, device).to(dtype)
    kinds = ("both", "scale", "shift")
    segs = []
    for start, end, s in row_runs:
        kind = kinds[s % 3]
        scale = _randn((shape[1],), g, device).to(dtype) if kind != "shift" else None
        shift = _randn((shape[1],), g, device).to(dtype) if kind != "scale" else None
        segs.append(ScaleShiftSegment(start, end, scale, shift))
    return y, segs


def check_scale_shift(monkeypatch: pytest.MonkeyPatch, y: torch.Tensor, segs: list) -> None:
    """2-D (rows, C) or NCHW (a row is an image): in place and differentiable, Triton against fp64 torch."""
    mask = covered(y.shape[0], segs, y.device)
    y3 = y.flatten(2) if y.ndim > 3 else y  # the ops take (rows, C) or (rows, C, inner)
    ref = segmented.scale_shift_(y3.double(), _double(segs))
    with kernel_path(monkeypatch, "unfused"), torch.no_grad():
        got = kernels.scale_shift_(y3.clone(), segs)
    assert rel_err(got[mask], ref[mask]) < TOL[y.dtype]
    assert torch.equal(got[~mask], y3[~mask])

    def grads(path: str, dtype: torch.dtype) -> list[torch.Tensor]:
        params = [t.detach().to(dtype).requires_grad_() for s in segs for t in (s.scale, s.shift) if t is not None]
        it = iter(params)
        mapped = [
            ScaleShiftSegment(s.start, s.end, *(next(it) if t is not None else None for t in (s.scale, s.shift)))
            for s in segs
        ]
        yy = y3.detach().to(dtype).requires_grad_()
        with kernel_path(monkeypatch, path):
            out = kernels.scale_shift(yy, mapped)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
        return list(torch.autograd.grad((out * w).sum(), [yy, *params]))

    for i, (a, b) in enumerate(zip(grads("unfused", y.dtype), grads("torch", torch.float64), strict=True)):
        assert rel_err(a, b) < GRAD_TOL[y.dtype], (i, rel_err(a, b))


def check_row_entry(rows: int, row_runs: list, device: str) -> None:
    """`_row_entry` (the backward's row -> entry map) matches the runs; on CUDA it must not sync with the host."""
    from multitask_peft.kernels import packing, triton_ops

    ranges = [(a, b) for a, b, _ in row_runs]
    tiles = packing.tiles_for(ranges, torch.device(device))
    expected = torch.full((rows,), len(ranges), dtype=torch.long)
    for w, (a, b) in enumerate(ranges):
        expected[a:b] = w
    if tiles.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        got = triton_ops._row_entry(tiles, rows, len(ranges))
        sums = triton_ops._segment_sum(torch.ones(rows, 3, device=device), got, len(ranges))
    finally:
        if tiles.is_cuda:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), expected)
    assert torch.equal(sums[:, 0].cpu(), torch.tensor([b - a for a, b in ranges], dtype=torch.float32))


def check_opcheck(rows: int, k: int, n: int, device: str) -> None:
    """Schemas, fake implementations and autograd registrations of the custom ops on `device` tensors."""
    from multitask_peft.kernels import packing, triton_ops

    x, y, segs = lora_case(rows, k, n, runs(4, rows // 4, 2), [4, 8], torch.float32, device)
    leaves = [t.clone().requires_grad_() for s in segs for t in _factors(s)]
    segs = [LoRASegment(s.start, s.end, leaves[2 * i], leaves[2 * i + 1], s.scale) for i, s in enumerate(segs)]
    (pack,) = packing.pack_lora(segs)
    tiles = packing.tiles_for(pack.ranges, x.device)
    meta = (pack.cols, pack.nslices, pack.scale, tiles)
    torch.library.opcheck(triton_ops.lowrank_op, (y.requires_grad_(), x, pack.down, pack.up, None, None, *meta, "gelu"))
    w, _, r, _ = pack.down.shape
    biases = torch.randn(w, r, device=device).requires_grad_(), torch.randn(w, n, device=device).requires_grad_()
    torch.library.opcheck(triton_ops.lowrank_op, (y, x, pack.down, pack.up, *biases, *meta, "silu"))
    for fused in (False, True):
        args = (y.detach().clone(), x, pack.down.detach(), pack.up.detach(), None, None, *meta, "identity", fused)
        torch.library.opcheck(triton_ops.lowrank_inplace_op, args)
    scale = torch.randn(w, n, device=device).requires_grad_()
    shift = torch.randn(w, n, device=device)
    torch.library.opcheck(triton_ops.scale_shift_op, (y.detach().unsqueeze(-1).requires_grad_(), scale, shift, tiles))
    torch.library.opcheck(
        triton_ops.scale_shift_inplace_op, (y.detach().clone().unsqueeze(-1), scale.detach(), None, tiles)
    )


# --- GPU tests --------------------------------------------------------------------------------------------------


@pytest.fixture
def exact_cuda_matmuls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path's cuBLAS calls as the tolerances assume: no TF32, no 16-bit reductions of partial sums."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)


@pytest.mark.gpu
@pytest.mark.usefixtures("exact_cuda_matmuls")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slots", [1, 8, 64])
@pytest.mark.parametrize(("k", "n"), VIT_B)
def test_vit_b_lora_paths(monkeypatch: pytest.MonkeyPatch, k: int, n: int, slots: int, dtype: torch.dtype) -> None:
    """Fused, unfused and torch path at ViT-B shapes, rank 16, slot -1 images mid-batch."""
    rows = IMAGES * TOKENS
    check_lora(monkeypatch, *lora_case(rows, k, n, runs(IMAGES, TOKENS, slots), [16], dtype, "cuda"))


@pytest.mark.gpu
@pytest.mark.usefixtures("exact_cuda_matmuls")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vit_b_qkv_slices(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """q and v slices of the fused qkv projection (k columns untouched), 8 slots."""
    rows, dim = IMAGES * TOKENS, 768
    x, y, segs = lora_case(rows, dim, dim, runs(IMAGES, TOKENS, 8), [16], dtype, "cuda")
    y = torch.cat([y, y.flip(0), y.roll(1, 0)], dim=1)
    sliced = [LoRASegment(s.start, s.end, s.lora_a, s.lora_b, s.scale, c * dim) for s in segs for c in (0, 2)]
    check_lora(monkeypatch, x, y, sliced)
    for path in ("fused", "unfused"):
        with kernel_path(monkeypatch, path), torch.no_grad():
            assert torch.equal(kernels.lora_(y.clone(), x, sliced)[:, dim : 2 * dim], y[:, dim : 2 * dim])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ranks(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Ranks 1 ... 64 (one chunk) and 128 / 256 (chunked), alone and padded together."""
    check_ranks(monkeypatch, 4 * 150, 384, 1152, [1, 2, 3, 8, 16, 17, 32, 48, 64, 128, 256], dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "k", "n", "slots"), [(1, 1, 1, 1), (37, 197, 385, 3), (5, 3, 1, 2), (130, 33, 20, 5)])
def test_odd_shapes(monkeypatch: pytest.MonkeyPatch, rows: int, k: int, n: int, slots: int) -> None:
    """Masking on every dimension, tiles shorter than BLOCK_M, and a non-contiguous x (a column slice)."""
    row_runs = runs(rows, 1, slots)
    check_lora(monkeypatch, *lora_case(rows, k, n, row_runs, [1, 4, 16], torch.float32, "cuda"))
    x, y, segs = lora_case(rows, k + 7, n, row_runs, [4], torch.float32, "cuda")
    check_lora(
        monkeypatch, x[:, 7:], y, [LoRASegment(s.start, s.end, s.lora_a[:, 7:], s.lora_b, s.scale) for s in segs]
    )


@pytest.mark.gpu
@pytest.mark.usefixtures("exact_cuda_matmuls")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vit_b_gradients(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    rows = IMAGES * TOKENS
    check_lora_grads(monkeypatch, *lora_case(rows, 768, 2304, runs(IMAGES, TOKENS, 8), [16], dtype, "cuda"))


@pytest.mark.gpu
@pytest.mark.usefixtures("exact_cuda_matmuls")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sequential", [False, True])
def test_vit_b_bottleneck(monkeypatch: pytest.MonkeyPatch, sequential: bool, dtype: torch.dtype) -> None:
    """Houlsby / Pfeiffer-style adapters (gelu, width 64) on ViT-B tokens, forward and backward."""
    rows = IMAGES * TOKENS
    z, y, segs = bottleneck_case(rows, 768, runs(IMAGES, TOKENS, 8), 64, "gelu", dtype, "cuda")
    check_bottleneck(monkeypatch, z, y, segs, sequential)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(IMAGES * TOKENS, 768), (IMAGES, 256, 56, 56)], ids=["tokens", "nchw"])
def test_scale_shift(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    tokens = TOKENS if len(shape) == 2 else 1
    y, segs = scale_shift_case(shape, runs(IMAGES, tokens, 8), dtype, "cuda")
    check_scale_shift(monkeypatch, y, segs)


@pytest.mark.gpu
def test_scale_shift_large_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image of 17.3M elements: more element blocks than a grid's axis 1 / 2 could hold at 256 a block."""
    y, segs = scale_shift_case((2, 3, 2400, 2400), [(1, 2, 0)], torch.float16, "cuda")
    check_scale_shift(monkeypatch, y, segs)


@pytest.mark.gpu
def test_large_y_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    """y beyond 2**31 elements, a segment on its last rows: offsets must be int64."""
    if torch.cuda.get_device_properties(0).total_memory < 24 << 30:
        pytest.skip("needs 24 GB of GPU memory")
    n = 768
    rows = (1 << 31) // n + 100
    y = torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16)
    x = torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16)
    xs, ys, segs = lora_case(90, n, n, [(10, 90, 0)], [16], torch.bfloat16, "cuda")
    x[-90:], y[-90:] = xs, ys
    shifted = [LoRASegment(rows - 90 + s.start, rows - 90 + s.end, s.lora_a, s.lora_b, s.scale) for s in segs]
    ref = segmented.lora_(ys.double(), xs.double(), _double(segs))
    for path in ("fused", "unfused"):
        with kernel_path(monkeypatch, path), torch.no_grad():
            got = kernels.lora_(y, x, shifted)[-90:].clone()
        y[-90:] = ys
        assert rel_err(got[10:], ref[10:]) < TOL[torch.bfloat16] and torch.equal(got[:10], ys[:10])


@pytest.mark.gpu
def test_row_entry_without_sync() -> None:
    check_row_entry(IMAGES * TOKENS, runs(IMAGES, TOKENS, 8), "cuda")


@pytest.mark.gpu
def test_custom_ops_opcheck() -> None:
    check_opcheck(4 * 35, 20, 12, "cuda")
