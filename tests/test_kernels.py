"""Every implementation of the batched multi-adapter ops against the reference (the spec).

The Triton kernels run on CUDA when a GPU is present and through Triton's interpreter otherwise (conftest sets
`TRITON_INTERPRET=1` on machines without CUDA). Scratch buffers are poisoned with NaN so that a kernel reading an
element no kernel wrote fails the comparison.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from multitask_peft import kernels
from multitask_peft.kernels import BottleneckSegment, LoRASegment, ScaleShiftSegment, reference, segmented

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from multitask_peft.kernels import triton_ops

    monkeypatch.setenv("MULTITASK_PEFT_KERNELS", "triton")
    monkeypatch.setattr(triton_ops, "POISON", True)


def _ranges(rows: int, num_slots: int, g: torch.Generator) -> list[tuple[int, int]]:
    """Random disjoint contiguous ranges covering part of the rows (gaps are slot -1 rows; some ranges empty)."""
    cuts = sorted(torch.randint(0, rows + 1, (2 * num_slots,), generator=g).tolist())
    return [(cuts[2 * k], cuts[2 * k + 1]) for k in range(num_slots)]


def _lora_segments(
    rows: int, d_in: int, d_out: int, ranks: list[int], g: torch.Generator, device: str = "cpu"
) -> list[LoRASegment]:
    return [
        LoRASegment(
            a,
            b,
            (torch.randn(r, d_in, generator=g) / d_in**0.5).to(device),
            (torch.randn(d_out, r, generator=g) / r**0.5).to(device),
            0.5 + k,
        )
        for k, ((a, b), r) in enumerate(zip(_ranges(rows, len(ranks), g), ranks, strict=True))
    ]


def _covered(rows: int, segments: list) -> torch.Tensor:
    mask = torch.zeros(rows, dtype=torch.bool)
    for s in segments:
        mask[s.start : s.end] = True
    return mask


def _grads(
    op: Callable, y: torch.Tensor, z: torch.Tensor, params: list[torch.Tensor], seed: int = 1
) -> list[torch.Tensor]:
    """Output and gradients of a random projection of `op(y, z)` w.r.t. y, z and the segment parameters."""
    y, z = y.clone().requires_grad_(), z.clone().requires_grad_()
    out = op(y, z)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    grads = torch.autograd.grad((out * w).sum(), [y, z, *params], allow_unused=True)
    return [out.detach(), *(torch.zeros_like(t) if d is None else d for t, d in zip([y, z, *params], grads))]


def _close(got: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 1e-4, rtol: float = 1e-4) -> None:
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a.cpu(), b.cpu(), atol=atol, rtol=rtol, msg=lambda m, i=i: f"tensor {i}: {m}")


# --- torch path (segmented.py) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "d_in", "d_out"), [(1, 8, 8), (37, 197, 385), (64, 384, 1152), (5, 3, 1)])
@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("num_slots", [0, 1, 5])
def test_segmented_lora_matches_reference(rows: int, d_in: int, d_out: int, rank: int, num_slots: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + rank * 10 + num_slots)
    x, y0 = torch.randn(rows, d_in, generator=g), torch.randn(rows, d_out, generator=g)
    segs = _lora_segments(rows, d_in, d_out, [rank] * num_slots, g)
    expected = reference.lora_(y0.clone(), x, segs)
    got = segmented.lora_(y0.clone(), x, segs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    covered = _covered(rows, segs)
    assert torch.equal(got[~covered], y0[~covered])  # slot -1 rows untouched
    if covered.any():
        assert not torch.allclose(got[covered], y0[covered])
    torch.testing.assert_close(segmented.lora(y0, x, segs), expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(reference.lora(y0, x, segs), expected)


def test_lora_column_slices() -> None:
    """q/k/v slices of a fused projection write only their own output columns."""
    g = torch.Generator().manual_seed(0)
    x, y0 = torch.randn(6, 10, generator=g), torch.randn(6, 3 * 7, generator=g)
    segs = [LoRASegment(1, 5, torch.randn(2, 10, generator=g), torch.randn(7, 2, generator=g), 1.0, c) for c in (0, 14)]
    got = segmented.lora_(y0.clone(), x, segs)
    torch.testing.assert_close(got, reference.lora_(y0.clone(), x, segs))
    assert torch.equal(got[:, 7:14], y0[:, 7:14]) and torch.equal(got[0], y0[0]) and torch.equal(got[5], y0[5])


def _scale_shift_segments(
    rows: int, channels: int, which: str, g: torch.Generator, device: str = "cpu"
) -> list[ScaleShiftSegment]:
    segs = []
    for k, (a, b) in enumerate(_ranges(rows, 3, g)):
        kind = ("scale", "shift", "both")[k % 3] if which == "mixed" else which
        scale = torch.randn(channels, generator=g).to(device) if kind in ("both", "scale") else None
        shift = torch.randn(channels, generator=g).to(device) if kind in ("both", "shift") else None
        segs.append(ScaleShiftSegment(a, b, scale, shift))
    return segs


@pytest.mark.parametrize(("shape"), [(1, 1), (33, 385), (100, 64), (7, 12, 9)])
@pytest.mark.parametrize("which", ["both", "scale", "shift", "mixed"])
def test_segmented_scale_shift_matches_reference(shape: tuple[int, ...], which: str) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    y0 = torch.randn(shape, generator=g)
    segs = _scale_shift_segments(shape[0], shape[1], which, g)
    expected = reference.scale_shift_(y0.clone(), segs)
    torch.testing.assert_close(segmented.scale_shift_(y0.clone(), segs), expected)
    torch.testing.assert_close(segmented.scale_shift(y0, segs), expected)
    assert torch.equal(reference.scale_shift(y0, segs), expected)


def _bottleneck_segments(
    rows: int, channels: int, dims: list[int], act: str, g: torch.Generator, device: str = "cpu"
) -> list[BottleneckSegment]:
    return [
        BottleneckSegment(
            a,
            b,
            *(
                t.to(device)
                for t in (
                    torch.randn(d, channels, generator=g) / channels**0.5,
                    torch.randn(d, generator=g),
                    torch.randn(channels, d, generator=g) / d**0.5,
                    torch.randn(channels, generator=g),
                )
            ),
            act,
            0.5 + k,
        )
        for k, ((a, b), d) in enumerate(zip(_ranges(rows, len(dims), g), dims, strict=True))
    ]


def _stacked(segs: list[BottleneckSegment], g: torch.Generator) -> list[BottleneckSegment]:
    """`segs` plus a second adapter on the rows of the first non-empty one (e.g. Houlsby + Pfeiffer in one task):
    a sequential pair must see each other's output."""
    first = next(s for s in segs if s.end > s.start)
    c = first.up.shape[0]
    extra = [torch.randn(3, c, generator=g) / c**0.5, torch.randn(3, generator=g), torch.randn(c, 3, generator=g)]
    return [*segs, BottleneckSegment(first.start, first.end, *extra, torch.randn(c, generator=g), first.act, 0.7)]


def _reference_bottleneck(y: torch.Tensor, x: torch.Tensor, segs: list, sequential: bool) -> torch.Tensor:
    out = y.clone()
    return reference.bottleneck_(out, out if sequential else x, segs)


@pytest.mark.parametrize("act", list(kernels.ACTIVATIONS))
@pytest.mark.parametrize("sequential", [False, True])
def test_segmented_bottleneck_matches_reference(act: str, sequential: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x, y0 = torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g)
    segs = _stacked(_bottleneck_segments(40, 24, [4, 8, 5], act, g), g)
    z = None if sequential else x
    expected = _reference_bottleneck(y0, x, segs, sequential)
    y = y0.clone()
    torch.testing.assert_close(segmented.bottleneck_(y, y if sequential else z, segs), expected)
    torch.testing.assert_close(segmented.bottleneck(y0, y0 if sequential else z, segs), expected)
    torch.testing.assert_close(reference.bottleneck(y0, y0 if sequential else x, segs), expected)


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MULTITASK_PEFT_KERNELS", raising=False)
    assert kernels.backend() == "torch" and kernels.backend(torch.zeros(1)) == "torch"  # auto: CPU -> torch
    monkeypatch.setenv("MULTITASK_PEFT_KERNELS", "reference")
    assert kernels.backend(torch.zeros(1)) == "reference"
    monkeypatch.setenv("MULTITASK_PEFT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.backend(torch.zeros(1))
    monkeypatch.setenv("MULTITASK_PEFT_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="'cuda-magic'"):
        kernels.backend()


def test_backend_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton takes fp16 / bf16 / fp32 CUDA tensors; `auto` sends fp64 to torch, a forced `triton` says why not."""
    monkeypatch.delenv("MULTITASK_PEFT_KERNELS", raising=False)
    cuda = {dtype: SimpleNamespace(is_cuda=True, dtype=dtype) for dtype in (*kernels.TRITON_DTYPES, torch.float64)}
    assert [kernels.backend(cuda[d]) for d in kernels.TRITON_DTYPES] == ["triton"] * 3  # a stand-in: no GPU here
    assert kernels.backend(cuda[torch.float64]) == "torch"
    monkeypatch.setenv("MULTITASK_PEFT_KERNELS", "triton")
    assert kernels.backend(cuda[torch.bfloat16]) == "triton"
    with pytest.raises(RuntimeError, match="torch.float64 CUDA tensors"):
        kernels.backend(cuda[torch.float64])


def test_pack_cache_follows_weights() -> None:
    """Inference packs index a persistent stack: any mix or order of known adapters reuses it (no restacking), an
    in-place update or a move to new storage adds an entry, the training path stacks its own launch, and a pool
    full of stale versions starts over instead of growing past the budget."""
    from multitask_peft.kernels import packing

    cache = packing.PackCache()
    g = torch.Generator().manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3, 4, 6, generator=g)), torch.nn.Parameter(torch.randn(3, 5, 4, generator=g))

    def pack(*slots: int, target: packing.PackCache | None = cache) -> packing.LowRankPack:
        starts = [0, 3, 5, 9][: len(slots) + 1]
        segments = [LoRASegment(s, e, a[k], b[k], 1.0) for k, s, e in zip(slots, starts, starts[1:])]
        (p,) = packing.pack_lora(segments, cache=target)
        return p

    def weights(p: packing.LowRankPack) -> list[torch.Tensor]:
        return [p.down[i, 0] for i in p.entries]

    with torch.no_grad():
        first = pack(0, 1)
        assert len(cache) == 2 and first.entries == (0, 1)
        assert pack(0, 1).down is first.down  # the stacked weights are reused
        swapped = pack(1, 0)  # another mix of the same adapters: same stack, other indices
        assert swapped.down is first.down and swapped.entries == (1, 0) and len(cache) == 2
        three = pack(2, 0, 1)  # an unseen adapter is appended; the others keep their index
        assert len(cache) == 3 and three.entries == (2, 0, 1)
        assert all(torch.equal(w, a[k]) for w, k in zip(weights(three), (2, 0, 1)))
        assert all(torch.equal(three.up[i, 0], b[k]) for i, k in zip(three.entries, (2, 0, 1)))
        a.add_(1.0)
        updated = pack(0, 1)
        assert len(cache) == 5 and torch.equal(weights(updated)[0], a[0]) and torch.equal(weights(updated)[1], a[1])
        a.data = a.data.double()
        b.data = b.data.double()
        moved = pack(0, 1)
        assert moved.down.dtype == torch.float64 and moved.entries == (0, 1)  # a pool of its own dtype
        tiles = packing.tiles_for(moved.ranges, a.device, cache, moved.entries)
        assert packing.tiles_for(moved.ranges, a.device, cache, moved.entries) is tiles
        assert tiles.tolist() == [[0, 0, 3], [1, 3, 5]]
        cache.clear()
        assert not len(cache) and pack(0, 1).down is not moved.down
        assert pack(0, target=None).down is not pack(0, target=None).down  # no cache: no reuse

    cache.clear()
    own = pack(0, 1)  # autograd records the weights: the launch's own differentiable stack, nothing cached
    assert own.down.requires_grad and own.entries == (0, 1) and not len(cache)

    small = packing.PackCache(max_bytes=3 * a[0].numel() * a.element_size())
    with torch.no_grad():
        for _ in range(4):
            a.add_(1.0)  # a new version each step: without a start-over the pool would keep them all
            p = pack(0, target=small)
            assert torch.equal(weights(p)[0], a[0])
        assert len(small) <= 2


# --- Triton ---------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("rows", "d_in", "d_out", "ranks"),
    [
        (1, 8, 8, [1]),
        (37, 197, 385, [4, 16, 1]),  # odd sizes: masking on every dim; mixed ranks padded in one launch
        (150, 64, 96, [64, 8]),  # several tiles per segment
        (90, 33, 20, [2] * 32),  # 32 slots, many empty
        (20, 16, 16, []),  # all rows slot -1
    ],
)
@pytest.mark.parametrize("fused", [False, True])
def test_triton_lora_matches_reference(
    device: str, rows: int, d_in: int, d_out: int, ranks: list[int], fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multitask_peft.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "FUSE_MIN_TILES", 0 if fused else 1 << 30)
    g = torch.Generator().manual_seed(rows + d_in + len(ranks))
    x, y0 = torch.randn(rows, d_in, generator=g), torch.randn(rows, d_out, generator=g)
    segs = _lora_segments(rows, d_in, d_out, ranks, g)
    expected = reference.lora_(y0.clone(), x, segs)
    dev_segs = [LoRASegment(s.start, s.end, s.lora_a.to(device), s.lora_b.to(device), s.scale) for s in segs]
    got = kernels.lora_(y0.to(device), x.to(device), dev_segs).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    covered = _covered(rows, segs)
    assert torch.equal(got[~covered], y0[~covered])


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("device", DEVICES)
def test_triton_lora_qkv_slices_and_overlaps(device: str) -> None:
    """Per-slice q/k/v factors (some adapters without k), and two updates of the same rows and columns."""
    g = torch.Generator().manual_seed(5)
    dim, d_in, rows = 24, 40, 70
    x, y0 = torch.randn(rows, d_in, generator=g), torch.randn(rows, 3 * dim, generator=g)

    def factors(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(r, d_in, generator=g).to(device), torch.randn(dim, r, generator=g).to(device)

    segs = [LoRASegment(0, 30, *factors(4), 0.5, c * dim) for c in (0, 1, 2)]
    segs += [LoRASegment(30, 50, *factors(8), 2.0, c * dim) for c in (0, 2)]  # q and v only
    segs += [LoRASegment(50, 60, *factors(4), 1.0, dim), LoRASegment(50, 60, *factors(2), 3.0, dim)]  # same cols
    expected = reference.lora_(y0.clone(), x, [_to_cpu(s) for s in segs])
    got = kernels.lora_(y0.to(device), x.to(device), segs).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[30:50, dim : 2 * dim], y0[30:50, dim : 2 * dim]) and torch.equal(got[60:], y0[60:])
    # gradients, against autograd through the reference
    params = [t for s in segs for t in (s.lora_a, s.lora_b)]
    leaves = [p.detach().clone().requires_grad_() for p in params]
    mapped = [LoRASegment(s.start, s.end, leaves[2 * i], leaves[2 * i + 1], s.scale, s.col) for i, s in enumerate(segs)]
    got = _grads(lambda yy, xx: kernels.lora(yy, xx, mapped), y0.to(device), x.to(device), leaves)
    ref = [p.detach().cpu().clone().requires_grad_() for p in leaves]  # the same parameters on the CPU
    ref_segs = [LoRASegment(s.start, s.end, ref[2 * i], ref[2 * i + 1], s.scale, s.col) for i, s in enumerate(segs)]
    expected = _grads(lambda yy, xx: reference.lora_(yy.clone(), xx, ref_segs), y0, x, ref)
    _close(got, expected, atol=2e-4)


def _to_cpu(seg: LoRASegment) -> LoRASegment:
    return LoRASegment(seg.start, seg.end, seg.lora_a.cpu(), seg.lora_b.cpu(), seg.scale, seg.col)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("rows", "d_in", "d_out", "ranks"), [(37, 197, 385, [4, 16, 1]), (150, 64, 96, [64, 8])])
def test_triton_lora_gradients(device: str, rows: int, d_in: int, d_out: int, ranks: list[int]) -> None:
    g = torch.Generator().manual_seed(rows)
    x, y0 = torch.randn(rows, d_in, generator=g), torch.randn(rows, d_out, generator=g)
    segs = _lora_segments(rows, d_in, d_out, ranks, g)
    cpu = [t.clone().requires_grad_() for s in segs for t in (s.lora_a, s.lora_b)]
    dev = [t.detach().to(device).requires_grad_() for t in cpu]

    def with_params(params: list[torch.Tensor]) -> list[LoRASegment]:
        return [LoRASegment(s.start, s.end, params[2 * i], params[2 * i + 1], s.scale) for i, s in enumerate(segs)]

    expected = _grads(lambda yy, xx: reference.lora_(yy.clone(), xx, with_params(cpu)), y0, x, cpu)
    got = _grads(lambda yy, xx: kernels.lora(yy, xx, with_params(dev)), y0.to(device), x.to(device), dev)
    _close(got, expected, atol=3e-4)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (33, 385), (130, 64), (7, 12, 9)])
@pytest.mark.parametrize("which", ["both", "scale", "shift", "mixed"])
def test_triton_scale_shift(device: str, shape: tuple[int, ...], which: str) -> None:
    g = torch.Generator().manual_seed(sum(shape) + len(which))
    y0 = torch.randn(shape, generator=g)
    segs = _scale_shift_segments(shape[0], shape[1], which, g)
    expected = reference.scale_shift_(y0.clone(), segs)
    dev_segs = [
        ScaleShiftSegment(s.start, s.end, *(t.to(device) if t is not None else None for t in (s.scale, s.shift)))
        for s in segs
    ]
    torch.testing.assert_close(kernels.scale_shift_(y0.to(device), dev_segs).cpu(), expected)
    params = [t for s in segs for t in (s.scale, s.shift) if t is not None]
    cpu = [p.clone().requires_grad_() for p in params]
    dev = [p.detach().to(device).requires_grad_() for p in cpu]

    def with_params(ps: list[torch.Tensor]) -> list[ScaleShiftSegment]:
        it = iter(ps)
        return [
            ScaleShiftSegment(s.start, s.end, *(next(it) if t is not None else None for t in (s.scale, s.shift)))
            for s in segs
        ]

    expected = _grads(lambda yy, _: reference.scale_shift_(yy.clone(), with_params(cpu)), y0, y0, cpu)
    got = _grads(lambda yy, _: kernels.scale_shift(yy, with_params(dev)), y0.to(device), y0.to(device), dev)
    _close(got, expected)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", list(kernels.ACTIVATIONS))
@pytest.mark.parametrize("sequential", [False, True])
def test_triton_bottleneck(device: str, act: str, sequential: bool) -> None:
    g = torch.Generator().manual_seed(7)
    rows, channels = 90, 40
    x, y0 = torch.randn(rows, channels, generator=g), torch.randn(rows, channels, generator=g)
    segs = _stacked(_bottleneck_segments(rows, channels, [4, 16, 5], act, g), g)
    expected = _reference_bottleneck(y0, x, segs, sequential)
    cpu = [t.clone().requires_grad_() for s in segs for t in (s.down, s.down_bias, s.up, s.up_bias)]
    dev = [t.detach().to(device).requires_grad_() for t in cpu]

    def with_params(ps: list[torch.Tensor]) -> list[BottleneckSegment]:
        return [BottleneckSegment(s.start, s.end, *ps[4 * i : 4 * i + 4], s.act, s.scale) for i, s in enumerate(segs)]

    y = y0.to(device)
    with torch.no_grad():
        got = kernels.bottleneck_(y, y if sequential else x.to(device), with_params(dev)).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    def ref_op(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return _reference_bottleneck(yy, xx, with_params(cpu), sequential)

    def dev_op(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return kernels.bottleneck(yy, yy if sequential else xx, with_params(dev))

    _close(_grads(dev_op, y0.to(device), x.to(device), dev), _grads(ref_op, y0, x, cpu), atol=2e-4)


@pytest.mark.usefixtures("triton_backend")
def test_triton_packs_from_inference_mode_serve_training() -> None:
    """Packs and tiles cached under `torch.inference_mode()` (serving) can be saved for backward afterwards."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 16, generator=g), torch.randn(30, 12, generator=g)
    scale = torch.randn(12, generator=g)  # frozen (no grad): its pack is cached
    segs = [ScaleShiftSegment(0, 20, scale, None)]
    with torch.inference_mode():
        kernels.scale_shift_(y.clone(), segs)
    yy = y.clone().requires_grad_()
    (grad,) = torch.autograd.grad(kernels.scale_shift(yy, segs).sum(), yy)
    assert torch.equal(grad[:20], scale.expand(20, -1)) and torch.equal(grad[20:], torch.ones(10, 12))
    lora = [LoRASegment(0, 30, torch.randn(2, 16, generator=g), torch.randn(12, 2, generator=g), 0.0)]
    torch.testing.assert_close(kernels.lora_(y.clone(), x, lora), y)  # scale 0 (alpha = 0) is a no-op


@pytest.mark.usefixtures("triton_backend")
def test_triton_custom_ops_opcheck() -> None:
    """Schemas, fake (meta) implementations and autograd registrations are consistent (what torch.compile needs)."""
    from multitask_peft.kernels import packing, triton_ops

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(70, 20, generator=g), torch.randn(70, 12, generator=g)
    segs = _lora_segments(70, 20, 12, [4, 4], g)
    leaves = [t.clone().requires_grad_() for s in segs for t in (s.lora_a, s.lora_b)]
    segs = [LoRASegment(s.start, s.end, leaves[2 * i], leaves[2 * i + 1], s.scale) for i, s in enumerate(segs)]
    (pack,) = packing.pack_lora(segs)
    tiles = packing.tiles_for(pack.ranges, x.device)
    args = (y.requires_grad_(), x, pack.down, pack.up, None, None, pack.cols, pack.nslices, pack.scale, tiles)
    torch.library.opcheck(triton_ops.lowrank_op, (*args, "identity"))
    scale, shift = torch.randn(2, 12, generator=g).requires_grad_(), torch.randn(2, 12, generator=g)
    torch.library.opcheck(triton_ops.scale_shift_op, (y.detach().unsqueeze(-1).requires_grad_(), scale, shift, tiles))


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize(("down_bias", "up_bias"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("rank", [8, 70])
def test_triton_lowrank_bias_flags(down_bias: bool, up_bias: bool, rank: int) -> None:
    """Either bias alone on the fused kernel (one flag gated both: a down bias alone read `scale` as the up bias)."""
    from multitask_peft.kernels import packing, triton_kernels

    g = torch.Generator().manual_seed(rank)
    ranges, k, n = [(0, 30), (40, 70)], 40, 72
    down, up = torch.randn(2, 1, rank, k, generator=g) / k**0.5, torch.randn(2, 1, n, rank, generator=g) / rank**0.5
    db = torch.randn(2, rank, generator=g) if down_bias else None
    ub = torch.randn(2, n, generator=g) if up_bias else None
    x, y, scale = torch.randn(70, k, generator=g), torch.randn(70, n, generator=g), torch.tensor([0.5, 2.0])
    tiles = packing.tiles_for(ranges, x.device)
    cols, nslices = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    got = triton_kernels.lowrank(x, down, up, tiles, nslices, cols, y.clone(), scale, db, ub, "gelu")
    expected = y.clone()
    for i, (a, b) in enumerate(ranges):
        h = torch.nn.functional.gelu(x[a:b] @ down[i, 0].T + (db[i] if down_bias else 0))
        expected[a:b] += scale[i] * (h @ up[i, 0].T + (ub[i] if up_bias else 0))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    rows, d_in, d_out = 300, 384, 1152
    x, y0 = torch.randn(rows, d_in, generator=g), torch.randn(rows, d_out, generator=g)
    segs = _lora_segments(rows, d_in, d_out, [16, 8, 16], g)
    expected = segmented.lora_(y0.double(), x.double(), [_cast(s, torch.float64, "cpu") for s in segs])
    got = kernels.lora_(y0.to("cuda", dtype), x.to("cuda", dtype), [_cast(s, dtype, "cuda") for s in segs])
    torch.testing.assert_close(got.double().cpu(), expected, atol=5e-2, rtol=2e-2)


def _cast(seg: LoRASegment, dtype: torch.dtype, device: str) -> LoRASegment:
    return LoRASegment(
        seg.start, seg.end, seg.lora_a.to(device, dtype), seg.lora_b.to(device, dtype), seg.scale, seg.col
    )


# --- the model on the Triton path -----------------------------------------------------------------------------


@pytest.mark.interpreter
def test_model_on_triton_matches_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed batch of LoRA (q/k/v slices), SSF and Pfeiffer tasks on a ViT: same outputs and gradients whether
    the multi-adapter layers run the Triton kernels (one batched differentiable op per adapter class) or torch."""
    import multitask_peft as mtp
    from conftest import make_model, randomize

    model, size = make_model("vit")
    recipes = {
        "lora": [mtp.peft.LoRA(r=4, targets=("qkv", "fc1"), qkv_slices=("q", "v"))],
        "patches": [mtp.peft.LoRA(r=3, targets=("patch_embed.proj",))],  # the patchify conv as one batched op
        "ssf": [mtp.peft.SSF()],
        "pfeiffer": [mtp.peft.Pfeiffer(dim=6)],
    }
    for name, peft in recipes.items():
        model.add_task(name, head=mtp.tasks.Classification(num_classes=3), peft=peft)
        randomize(model.task(name))
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    slots = [model.slot(t) for t in ("ssf", "lora", "pfeiffer", "lora", "ssf", "patches")]

    def run(backend: str) -> list[torch.Tensor]:
        monkeypatch.setenv("MULTITASK_PEFT_KERNELS", backend)
        with torch.no_grad():
            pooled = model.forward_features(images, slots).pooled
        out = model(images, slots)
        loss = sum((logits * torch.arange(3.0)).sum() for _, logits in out.values())
        params = [p for t in model.tasks for p in model.trainable_parameters(t)]
        return [pooled, *torch.autograd.grad(loss, params)]

    from multitask_peft.kernels import triton_ops

    calls: dict[str, int] = {}
    for op in ("lora", "lora_", "scale_shift", "scale_shift_", "bottleneck", "bottleneck_"):
        fn = getattr(triton_ops, op)
        monkeypatch.setattr(
            triton_ops, op, lambda *a, _fn=fn, _op=op, **kw: calls.update({_op: calls.get(_op, 0) + 1}) or _fn(*a, **kw)
        )
    torch_path = run("torch")
    assert not calls
    triton_path = run("triton")
    assert all(calls.get(op) for op in ("lora", "lora_", "scale_shift", "scale_shift_", "bottleneck", "bottleneck_"))
    _close(triton_path, torch_path, atol=1e-4, rtol=1e-3)


@pytest.mark.interpreter  # forces Triton on CPU tensors
def test_stacked_weights_belong_to_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each adapted layer keeps the stacked kernel weights of its own adapters: reused across batches, rebuilt when
    a task attaches or detaches, and another model's task changes never drop them."""
    import multitask_peft as mtp
    from conftest import make_model, randomize

    monkeypatch.setenv("MULTITASK_PEFT_KERNELS", "triton")
    models = []
    for seed in (0, 1):
        model, size = make_model("vit")
        for name in ("a", "b"):
            model.add_task(name, head=mtp.tasks.Classification(num_classes=3), peft=[mtp.peft.LoRA(r=2)])
            randomize(model.task(name), seed=seed)
        models.append(model)
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))

    def packs(model: mtp.MultiTaskModel) -> int:
        layers = [m for m in model.backbone.model.modules() if hasattr(m, "packs")]
        assert layers and all(m.packs is model.backbone.packs for m in layers)  # one cache (and budget) per model
        return len(model.backbone.packs)

    with torch.no_grad():
        before = models[0].predict(images, ["a", "b"])
        models[1].predict(images, ["a", "b"])
    assert packs(models[0]) and packs(models[1])  # the Triton path kept its weights
    copied = copy.deepcopy(models[0])
    assert copied.backbone.packs is not models[0].backbone.packs and not packs(copied)  # other storage: nothing kept
    models[1].remove_task("b")
    assert packs(models[0])  # untouched by the other model's change
    assert not packs(models[1])  # its own are rebuilt on next use
    with torch.no_grad():
        again = models[0].predict(images, ["a", "b"])
    for task in ("a", "b"):
        for x, y in zip(again[task], before[task], strict=True):
            torch.testing.assert_close(x["logits"], y["logits"])
    models[0].clear_kernel_cache()  # after writes through `.data`
    assert not packs(models[0])


@pytest.mark.usefixtures("triton_backend")
def test_gpu_checks_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The helpers of test_kernels_gpu.py at small sizes on the CPU (they run first on a GPU otherwise)."""
    import test_kernels_gpu as gpu

    row_runs = gpu.runs(6, 11, 3)
    assert row_runs and all(0 <= s < 3 for *_, s in row_runs) and len({a for a, *_ in row_runs}) == len(row_runs)
    gpu.check_lora(monkeypatch, *gpu.lora_case(66, 24, 40, row_runs, [4, 1], torch.float32, "cpu"))
    gpu.check_lora_grads(monkeypatch, *gpu.lora_case(66, 24, 40, row_runs, [4], torch.float32, "cpu"))
    gpu.check_ranks(monkeypatch, 4 * 9, 20, 24, [1, 16, 65, 130], torch.float32, "cpu")
    for sequential, dim in ((False, 70), (True, 6)):  # width 70: two rank chunks, the up bias added once
        z, y, segs = gpu.bottleneck_case(66, 24, row_runs, dim, "gelu", torch.float32, "cpu")
        gpu.check_bottleneck(monkeypatch, z, y, segs, sequential)
    for shape, tokens in (((66, 24), 11), ((6, 5, 7, 3), 1)):
        gpu.check_scale_shift(monkeypatch, *gpu.scale_shift_case(shape, gpu.runs(6, tokens, 3), torch.float32, "cpu"))
    gpu.check_row_entry(66, row_runs, "cpu")
    gpu.check_opcheck(4 * 35, 20, 12, "cpu")
