"""Strict dataclass configs: `from_dict` rejects unknown keys, `to_dict` is JSON-ready."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

C = TypeVar("C", bound="ConfigBase")

TASK_NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")


def check_task_name(name: object) -> str:
    """Validate a task name (`[a-z0-9_-]{1,64}`) and return it."""
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name):
        raise ValueError(f"task name must match [a-z0-9_-]{{1,64}} but the value passed is {name!r}")
    return name


def check_positive_int(owner: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: `{field}` should be a positive integer value but the value passed is {value!r}")


def check_positive_float(owner: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{owner}: `{field}` should be a positive number but the value passed is {value!r}")


def check_choice(owner: str, field: str, value: object, choices: typing.Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: `{field}` must be one of {choices} but the value passed is {value!r}")


def check_class_names(owner: str, class_names: object, num_classes: int) -> tuple[str, ...] | None:
    """Validate optional class names (one string per class) and return them as a tuple."""
    if class_names is None:
        return None
    if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
        raise ValueError(f"{owner}: `class_names` must be a sequence of strings, got {class_names!r}")
    names = tuple(class_names)
    if len(names) != num_classes:
        raise ValueError(f"{owner}: {len(names)} class_names given for num_classes={num_classes}")
    return names


@dataclasses.dataclass
class ConfigBase:
    """Base of every config dataclass (PEFT methods, heads)."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}: {data!r}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(hints.get(k), v) for k, v in data.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}


def _coerce(hint: Any, value: Any) -> Any:
    """JSON / YAML give lists where the dataclass wants tuples."""
    if isinstance(value, list) and "tuple" in str(hint).lower():
        return tuple(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
