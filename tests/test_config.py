"""`ConfigBase`: strict `from_dict` at every nesting level, `to_dict` back to plain data."""

from __future__ import annotations

import dataclasses

import pytest

from multitask_peft.config import ConfigBase, custom


@dataclasses.dataclass
class Leaf(ConfigBase):
    size: int = 1
    names: tuple[str, ...] | None = None


@dataclasses.dataclass
class Plain:  # a dataclass that is not a ConfigBase (as MultiFashionConfig)
    seed: int = 0


def _parse_kind(data: object) -> Leaf:
    assert isinstance(data, dict)
    return Leaf.from_dict({k: v for k, v in data.items() if k != "kind"})


@dataclasses.dataclass
class Root(ConfigBase):
    leaf: Leaf
    maybe: Leaf | None = None
    many: list[Leaf] = dataclasses.field(default_factory=list)
    named: dict[str, Leaf] = dataclasses.field(default_factory=dict)
    plain: Plain | None = None
    picked: Leaf = custom(parse=_parse_kind, dump=lambda v: {"kind": "leaf", **v.to_dict()}, default_factory=Leaf)


def test_nested_from_dict_to_dict_round_trip() -> None:
    data = {
        "leaf": {"size": 2, "names": ["a", "b"]},
        "maybe": None,
        "many": [{"size": 3}, {}],
        "named": {"x": {"size": 4}},
        "plain": {"seed": 5},
        "picked": {"kind": "leaf", "size": 6},
    }
    root = Root.from_dict(data)
    assert root.leaf == Leaf(2, ("a", "b")) and root.maybe is None and root.many == [Leaf(3), Leaf()]
    assert root.named == {"x": Leaf(4)} and root.plain == Plain(5) and root.picked == Leaf(6)
    out = root.to_dict()
    assert out["leaf"] == {"size": 2, "names": ["a", "b"]} and out["plain"] == {"seed": 5}
    assert out["picked"] == {"kind": "leaf", "size": 6, "names": None}
    assert Root.from_dict(out) == root


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ({"leaf": {}, "extra": 1}, ValueError, r"Root: unknown key\(s\) \['extra'\]; valid keys: \['leaf', 'many'"),
        ({"leaf": {"sise": 1}}, ValueError, r"Leaf: unknown key\(s\) \['sise'\]; valid keys: \['names', 'size'\]"),
        ({"leaf": {}, "many": [{"x": 1}]}, ValueError, r"Leaf: unknown key\(s\) \['x'\]"),
        ({"leaf": {}, "named": {"a": {"x": 1}}}, ValueError, r"Leaf: unknown key\(s\) \['x'\]"),
        ({"leaf": {}, "plain": {"x": 1}}, ValueError, r"Plain: unknown key\(s\) \['x'\]; valid keys: \['seed'\]"),
        ({}, ValueError, r"Root: missing key\(s\) \['leaf'\]"),
        ({"leaf": None}, ValueError, "leaf: Leaf.from_dict expects a mapping"),  # (a ConfigError, with its path)
        ({"leaf": {}, "many": {"size": 1}}, ValueError, "expected a list of Leaf entries"),
        ({"leaf": {}, "named": [1]}, ValueError, "expected a mapping of name -> Leaf"),
    ],
)
def test_strict_at_every_level(data: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Root.from_dict(data)


def test_yaml_numbers_in_every_usual_form(tmp_path) -> None:  # noqa: ANN001
    """`1e-3` (a string to YAML 1.1), `3.0e-3` and `1_000` are numbers in config files and in `--set` alike."""
    import yaml

    from multitask_peft.config import load_yaml
    from multitask_peft.run_config import load_run_config

    assert load_yaml("a: 1e-3\nb: 3.0e-3\nc: 1_000\nd: 1.0E3\ne: '1e-3'\nf: 1e3x") == {
        "a": 0.001, "b": 0.003, "c": 1000, "d": 1000.0, "e": "1e-3", "f": "1e3x"
    }  # fmt: skip
    config = {
        "backbone": {"name": "test_vit"},
        "tasks": {"a": {"head": {"type": "classification", "num_classes": 2}, "data": {"source": "imagefolder"}}},
        "train": {"lr": "LR", "steps": 10},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config).replace("LR", "1e-3").replace("'1e-3'", "1e-3"))
    assert load_run_config(path).train.lr == 0.001
    assert load_run_config(path, ["train.lr=3.0e-4", "train.steps=1_000"]).train.steps == 1000


def test_every_config_error_reported_at_once(tmp_path) -> None:  # noqa: ANN001
    """Three mistakes in three places: one error that names all three, each with its path."""
    import yaml

    from multitask_peft.config import ConfigError
    from multitask_peft.run_config import load_run_config

    config = {
        "backbone": {"name": "test_vit", "colour": "red"},
        "tasks": {
            "a": {"head": {"type": "classification", "num_classes": 0}, "data": {"source": "imagefolder"}},
            "b": {
                "head": {"type": "classification", "num_classes": 2},
                "data": {"source": "imagefolder", "augment": "x"},
            },
        },
        "train": {"lr": 0.001, "steps": 10},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    paths = [p for p, _ in info.value.errors]
    assert paths == ["backbone", "tasks.a.head", "tasks.b.data"], info.value.errors
    message = str(info.value)
    assert message.startswith("3 config errors:") and "colour" in message and "num_classes" in message
    assert "augment" in message
