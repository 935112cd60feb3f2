"""The segmented torch path of each batched op against its reference (the spec)."""

from __future__ import annotations

import pytest
import torch

from multitask_peft import kernels
from multitask_peft.kernels import reference, segmented


def _segments(rows: int, num_slots: int, g: torch.Generator) -> list[tuple[int, int]]:
    """Random contiguous segments covering part of the rows (gaps are slot -1 rows; some segments empty)."""
    cuts = sorted(torch.randint(0, rows + 1, (2 * num_slots,), generator=g).tolist())
    return [(cuts[2 * k], cuts[2 * k + 1]) for k in range(num_slots)]


@pytest.mark.parametrize(("rows", "d_in", "d_out"), [(1, 8, 8), (37, 197, 385), (64, 384, 1152), (5, 3, 1)])
@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("num_slots", [0, 1, 5])
def test_lora_matches_reference(rows: int, d_in: int, d_out: int, rank: int, num_slots: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + rank * 10 + num_slots)
    x = torch.randn(rows, d_in, generator=g)
    y0 = torch.randn(rows, d_out, generator=g)
    segs = [
        kernels.LoRASegment(
            a,
            b,
            torch.randn(rank, d_in, generator=g) / d_in**0.5,
            torch.randn(d_out, rank, generator=g) / rank**0.5,
            0.5 + k,
        )
        for k, (a, b) in enumerate(_segments(rows, num_slots, g))
    ]
    expected = reference.lora_(y0.clone(), x, segs)
    got = segmented.lora_(y0.clone(), x, segs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    covered = torch.zeros(rows, dtype=torch.bool)
    for s in segs:
        covered[s.start : s.end] = True
    assert torch.equal(got[~covered], y0[~covered])  # slot -1 rows untouched
    if any(s.end > s.start for s in segs):
        assert not torch.allclose(got[covered], y0[covered])


def test_lora_column_slices() -> None:
    """q/k/v slices of a fused projection write only their own output columns."""
    g = torch.Generator().manual_seed(0)
    x, y0 = torch.randn(6, 10, generator=g), torch.randn(6, 3 * 7, generator=g)
    segs = [
        kernels.LoRASegment(1, 5, torch.randn(2, 10, generator=g), torch.randn(7, 2, generator=g), 1.0, col)
        for col in (0, 14)
    ]
    got = segmented.lora_(y0.clone(), x, segs)
    torch.testing.assert_close(got, reference.lora_(y0.clone(), x, segs))
    assert torch.equal(got[:, 7:14], y0[:, 7:14]) and torch.equal(got[0], y0[0]) and torch.equal(got[5], y0[5])


@pytest.mark.parametrize(("rows", "channels"), [(1, 1), (33, 385), (100, 64)])
@pytest.mark.parametrize("which", ["both", "scale", "shift"])
def test_scale_shift_matches_reference(rows: int, channels: int, which: str) -> None:
    g = torch.Generator().manual_seed(rows + channels)
    y0 = torch.randn(rows, channels, generator=g)
    segs = []
    for a, b in _segments(rows, 3, g):
        scale = torch.randn(channels, generator=g) if which in ("both", "scale") else None
        shift = torch.randn(channels, generator=g) if which in ("both", "shift") else None
        segs.append(kernels.ScaleShiftSegment(a, b, scale, shift))
    torch.testing.assert_close(segmented.scale_shift_(y0.clone(), segs), reference.scale_shift_(y0.clone(), segs))


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.backend() == "torch"
    monkeypatch.setenv("MULTITASK_PEFT_KERNELS", "reference")
    assert kernels.backend() == "reference"
    monkeypatch.setenv("MULTITASK_PEFT_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="'cuda-magic'"):
        kernels.backend()
