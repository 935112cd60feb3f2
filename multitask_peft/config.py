"""Strict dataclass configs: `from_dict` rejects unknown keys, `to_dict` is JSON-ready."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

C = TypeVar("C", bound="ConfigBase")
T = TypeVar("T")

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


def check_unit_interval(owner: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: `{field}` should be in [0, 1] but the value passed is {value!r}")


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


def custom(parse: Callable[[Any], Any], dump: Callable[[Any], Any], **field_options: Any) -> Any:
    """A dataclass field that `from_dict` / `to_dict` read and write with functions of its own, for a value whose
    class is picked by the data (a head by its `type`, PEFT methods by their `method`).

    Example:
        head: HeadConfig = custom(parse=head_from_dict, dump=head_to_dict)
    """
    return dataclasses.field(metadata={"parse": parse, "dump": dump}, **field_options)


@dataclasses.dataclass
class ConfigBase:
    """Base of every config dataclass (PEFT methods, heads, run configs).

    `from_dict` is strict at every level: a field typed as a dataclass (or `X | None`, `list[X]`, `dict[str, X]` of
    one) is read with that dataclass's own strict `from_dict`; `to_dict` writes them back as plain dicts and lists.
    """

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        return dataclass_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)


class ConfigError(ValueError):
    """Every error found in a nested config at once, each with the path of the key it is about
    (`tasks.garment.head: ...`). A ValueError, so callers that catch one keep working."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        lines = [f"{path}: {message}" if path else message for path, message in errors]
        super().__init__(lines[0] if len(lines) == 1 else f"{len(lines)} config errors:\n" + "\n".join(lines))


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if path else prefix


def _collect(errors: list[tuple[str, str]], path: str, fn: Callable[[], T]) -> T | None:
    """`fn()`, or None with its error(s) recorded under `path` (nested ConfigErrors keep their own paths)."""
    try:
        return fn()
    except ConfigError as e:
        errors.extend((_join(path, p), m) for p, m in e.errors)
    except (ValueError, TypeError, KeyError) as e:
        errors.append((path, str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)))
    return None


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build the dataclass `cls` from a mapping; unknown or missing keys are errors that list the valid ones. Every
    error of the mapping and of the configs nested in it is reported at once (`ConfigError`)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}: {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    errors: list[tuple[str, str]] = []
    unknown = sorted(set(data) - set(fields))
    if unknown:
        errors.append(("", f"{cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(fields)}"))
    required = [n for n, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        errors.append(("", f"{cls.__name__}: missing key(s) {missing}; valid keys: {sorted(fields)}"))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            continue
        parse = fields[key].metadata.get("parse")
        before = len(errors)
        result = _collect(errors, key, lambda p=parse, k=key, v=value: p(v) if p else _coerce(hints.get(k), v))
        if len(errors) == before:
            kwargs[key] = result
    if errors:
        raise ConfigError(errors)
    built = _collect(errors, "", lambda: cls(**kwargs))
    if errors:
        raise ConfigError(errors)
    return built


def dataclass_to_dict(config: Any) -> dict[str, Any]:
    """The init fields of a dataclass as plain dicts, lists and scalars (JSON / YAML ready)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.init:
            dump = f.metadata.get("dump")
            value = getattr(config, f.name)
            out[f.name] = dump(value) if dump is not None else _plain(value)
    return out


def _coerce(hint: Any, value: Any) -> Any:
    """A YAML / JSON value as the field's type wants it: nested dataclasses built (strictly), lists made tuples."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:  # X | None
        return None if value is None else _coerce(args[0], value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint.from_dict(value) if issubclass(hint, ConfigBase) else dataclass_from_dict(hint, value)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ValueError(f"expected a list of {args[0].__name__} entries, got {value!r}")
        return _each(args[0], dict(enumerate(value)), list)
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a mapping of name -> {args[1].__name__}, got {value!r}")
        return _each(args[1], value, dict)
    if isinstance(value, list) and "tuple" in str(hint).lower():
        return tuple(value)
    return value


def _each(hint: Any, items: Mapping[Any, Any], container: type) -> Any:
    """Every item coerced, the errors of all of them reported together (each under its key or index)."""
    errors: list[tuple[str, str]] = []
    out = {k: _collect(errors, str(k), lambda v=v: _coerce(hint, v)) for k, v in items.items()}
    if errors:
        raise ConfigError(errors)
    return list(out.values()) if container is list else out


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus YAML 1.2 floats: `1e-3` and `1.0e3` are numbers, not strings (YAML 1.1 wants a dot
    and a signed exponent)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML as configs are read everywhere (files and `--set` values): numbers in every usual form."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def _plain(value: Any) -> Any:
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclass_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
