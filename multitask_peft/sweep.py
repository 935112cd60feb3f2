"""Hyper-parameter sweeps as one multi-task run: every configuration is a task on the same frozen backbone.

A sweep config is a run config (`run_config`) in which some values are lists of candidates:

```yaml
tasks:
  garments:
    head: {type: classification, num_classes: 10}
    peft:                                   # alternatives: a list of recipes (here LoRA, SSF, a linear probe)
      - [{method: lora, r: [1, 8, 32]}]     # a list on a method option: one configuration per value
      - [{method: ssf}]
      - []
    data: {source: imagefolder, root: data/garments}
train: {steps: 600, lr: [1.0e-3, 1.0e-2], weight_decay: [1.0e-4, 1.0e-3]}
sweep: {holdout: 0.1}
output: runs/sweep
```

`expand_sweep` turns every task into one task per combination (here 5 recipes x 2 lr x 2 weight decays = 20
configurations named `garments-00` ... `garments-19`). They all draw from ONE batch stream (`TaskSpec.stream`:
the same batches, loaded once, one routed forward per step with the backbone prefix they share run once per
image), each with its own head, optimizer groups, learning rate and weight decay, gradient clipping per task and
initial weights seeded by the task it came from: a configuration ends with the weights it gets when trained
alone with the same seed. A fraction of the training split (`sweep.holdout`) is set aside for selection; the
configuration with the best held-out metric (and the best of every method family) is then measured on the
evaluation split, which plays no part in the choice.

Sweepable: any option of a PEFT method whose value is a single number / string / bool (a list is a sweep; a
tuple-valued option such as `targets` is swept with `{sweep: [[qkv], [qkv, fc1]]}`), and `lr`, `head_lr`,
`weight_decay` in `train` or in a task. Everything else is shared by all configurations (the batches, the steps,
the data), and a list there is an error.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import time
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigBase, ConfigError, check_positive_int
from .run_config import HOLDOUT, RunConfig, TaskSpec, read_config_dict

SWEEPABLE_OPTIM = ("lr", "head_lr", "weight_decay")
SWEEP_FILE = "sweep.yaml"  # the sweep config as given (config.yaml is the expanded run)
RESULTS_JSON = "sweep.json"
RESULTS_MD = "sweep.md"


@dataclasses.dataclass
class SweepSpec(ConfigBase):
    """The `sweep:` section of a sweep config.

    Args:
        holdout: Fraction of each task's training split set aside for choosing a configuration (`DataSpec.holdout`;
            a task's own `data.holdout` wins).
        max_configs: Refuse sweeps that expand to more configurations than this per task (a typo in a list
            should not start a run of thousands).
    """

    holdout: float = 0.1
    max_configs: int = 64

    def __post_init__(self) -> None:
        h = self.holdout
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0.0 < h < 1.0:
            raise ValueError(f"sweep: `holdout` should be a fraction in (0, 1) but the value passed is {h!r}")
        check_positive_int("sweep", "max_configs", self.max_configs)


@dataclasses.dataclass(frozen=True)
class Member:
    """One configuration of a sweep.

    Attributes:
        name: Its task name in the run (`<task>-<k>`).
        task: The sweep config's task it comes from (also its batch stream and init seed).
        family: Its PEFT methods joined by "+" ("linear_probe" for none).
        settings: The swept values that pick it, e.g. {"lora.r": 8, "lr": 0.001} (values with one candidate left
            out).
    """

    name: str
    task: str
    family: str
    settings: dict[str, Any]


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> tuple[RunConfig, list[Member], SweepSpec]:
    """Read a sweep config (with `key=value` overrides) and expand it (`expand_sweep`)."""
    return expand_sweep(read_config_dict(path, list(overrides)))


def expand_sweep(data: Mapping[str, Any]) -> tuple[RunConfig, list[Member], SweepSpec]:
    """The run a sweep config describes: one task per configuration (see the module docstring).

    Returns:
        (the expanded run config, its members in task order, the sweep options).

    Raises:
        ConfigError: Every problem found, each with its path (a list on a field that cannot be swept, a sweep
            larger than `max_configs`, ...).
    """
    from .peft import METHODS

    data = copy.deepcopy(dict(data))
    errors: list[tuple[str, str]] = []
    try:
        spec = SweepSpec.from_dict(data.pop("sweep", None) or {})
    except (ConfigError, ValueError, TypeError) as e:
        errors.append(("sweep", str(e)))
        spec = SweepSpec()
    train = dict(data.get("train") or {})
    train_axes = {}
    for key, value in list(train.items()):
        candidates = _candidates(value, sweepable=key in SWEEPABLE_OPTIM)
        if candidates is None:
            continue
        if key not in SWEEPABLE_OPTIM:
            errors.append((f"train.{key}", _not_sweepable(key)))
            continue
        train_axes[key] = candidates
        del train[key]
    if train.get("tasks_per_step") is not None:
        errors.append(("train.tasks_per_step", "a sweep trains every configuration on every step; leave it unset"))
    train["clip_scope"] = "task"  # no configuration's gradients may change another's update
    train.setdefault("on_nonfinite", "drop_task")  # a diverging configuration stops alone, the others go on
    data["train"] = train

    tasks = data.get("tasks")
    if not isinstance(tasks, Mapping) or not tasks:
        raise ConfigError([*errors, ("tasks", "a sweep config needs at least one task")])
    expanded: dict[str, Any] = {}
    members: list[Member] = []
    for task, raw in tasks.items():
        path = f"tasks.{task}"
        if not isinstance(raw, Mapping):
            errors.append((path, f"a task is a mapping with head / peft / data, got {raw!r}"))
            continue
        raw = dict(raw)
        for section in ("head", "data"):
            for key, value in (raw.get(section) or {}).items():
                if isinstance(value, list) and _scalar_option(section, raw.get(section), key):
                    errors.append((f"{path}.{section}.{key}", _not_sweepable(key)))
        axes: dict[str, list[Any]] = {}
        for key in SWEEPABLE_OPTIM:
            candidates = _candidates(raw.get(key), sweepable=True)
            if candidates is not None:
                axes[key] = candidates
                raw.pop(key)
            elif key in train_axes and key not in raw:
                axes[key] = train_axes[key]
        recipes = _recipes(raw.get("peft", []), f"{path}.peft", METHODS, errors)
        combos = [
            (recipe, settings, dict(zip(axes, values, strict=True)))
            for recipe, settings in recipes
            for values in itertools.product(*axes.values())
        ]
        if len(combos) > spec.max_configs:
            too_many = f"expands to {len(combos)} configurations, more than sweep.max_configs={spec.max_configs}"
            errors.append((path, too_many))
            continue
        varied = _varied([{**s, **o} for _, s, o in combos])
        width = len(str(len(combos) - 1))
        data_spec = dict(raw.get("data") or {})
        data_spec.setdefault("holdout", spec.holdout)
        for k, (recipe, settings, optim) in enumerate(combos):
            name = f"{task}-{k:0{width}d}"
            member = {**raw, "peft": recipe, "data": data_spec, "stream": task, **optim}
            expanded[name] = member
            family = "+".join(entry["method"] for entry in recipe) or "linear_probe"
            chosen = {key: value for key, value in {**settings, **optim}.items() if key in varied}
            members.append(Member(name, task, family, chosen))
    if errors:
        raise ConfigError(errors)
    data["tasks"] = expanded
    try:
        config = RunConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError([(_member_path(p, members), m) for p, m in e.errors]) from None
    return config, members, spec


def _member_path(path: str, members: list[Member]) -> str:
    """`tasks.garments-03.peft` -> `tasks.garments.peft (configuration garments-03)` for errors of expanded tasks."""
    for m in members:
        prefix = f"tasks.{m.name}"
        if path == prefix or path.startswith(prefix + "."):
            return f"tasks.{m.task}{path[len(prefix) :]} (configuration {m.name})"
    return path


def _not_sweepable(key: str) -> str:
    return (
        f"`{key}` cannot be swept (every configuration of a sweep shares the batches, steps and data); sweepable: "
        f"PEFT method options, {', '.join(SWEEPABLE_OPTIM)} (in `train` or in a task)"
    )


def _candidates(value: Any, sweepable: bool) -> list[Any] | None:
    """The candidates a value sweeps over, or None when it is a plain value: a list on a scalar field, or the
    explicit `{sweep: [...]}` form."""
    if isinstance(value, Mapping) and set(value) == {"sweep"}:
        values = value["sweep"]
        if not isinstance(values, list) or not values:
            raise ConfigError([("", f"`sweep:` takes a non-empty list of candidates, got {values!r}")])
        return list(values)
    if isinstance(value, list):
        if not value and sweepable:
            raise ConfigError([("", "an empty list of candidates")])
        return list(value)
    return None


def _scalar_option(section: str, mapping: Any, key: str) -> bool:
    """Whether option `key` of a head / data mapping holds one scalar (so a list there means a sweep)."""
    from .heads import HEADS
    from .run_config import DataSpec

    if section == "data":
        cls = DataSpec
    else:
        try:
            cls = HEADS.get(mapping.get("type"))
        except (ValueError, KeyError, AttributeError):
            return False
    return _is_scalar_field(cls, key)


def _is_scalar_field(cls: type, key: str) -> bool:
    hints = typing.get_type_hints(cls)
    if key not in hints:
        return False
    kinds = typing.get_args(hints[key]) if isinstance(hints[key], types.UnionType) else (hints[key],)
    return all(k in (int, float, str, bool, type(None)) for k in kinds)


def _recipes(
    peft: Any, path: str, methods: Any, errors: list[tuple[str, str]]
) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Every concrete recipe of a task's `peft` entry, with the swept method options that made it."""
    if not isinstance(peft, list):
        errors.append((path, f"a PEFT recipe is a list of {{method: ...}} entries (or a list of such lists): {peft!r}"))
        return []
    alternatives = peft if peft and all(isinstance(r, list) for r in peft) else [peft]
    out: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
    for a, recipe in enumerate(alternatives):
        where = f"{path}[{a}]" if len(alternatives) > 1 else path
        per_method: list[list[tuple[dict[str, Any], dict[str, Any]]]] = []
        for m, entry in enumerate(recipe):
            if not isinstance(entry, Mapping) or "method" not in entry:
                errors.append((f"{where}[{m}]", f"a PEFT entry is {{method: name, ...options}}, got {entry!r}"))
                continue
            try:
                cls = methods.get(entry["method"])
            except ValueError as e:
                errors.append((f"{where}[{m}].method", str(e)))
                continue
            axes = {}
            for key, value in entry.items():
                if key == "method":
                    continue
                try:
                    candidates = _candidates(value, sweepable=True)
                except ConfigError as e:
                    errors.append((f"{where}[{m}].{key}", e.errors[0][1]))
                    continue
                explicit = isinstance(value, Mapping)
                if candidates is not None and (explicit or _is_scalar_field(cls, key)):
                    axes[key] = candidates
            options = []
            for values in itertools.product(*axes.values()):
                chosen = dict(zip(axes, values, strict=True))
                options.append(({**entry, **chosen}, {f"{entry['method']}.{k}": v for k, v in chosen.items()}))
            per_method.append(options)
        for combo in itertools.product(*per_method):
            out.append(([dict(e) for e, _ in combo], {k: v for _, s in combo for k, v in s.items()}))
    return out


def _varied(settings: list[dict[str, Any]]) -> set[str]:
    """The keys whose value differs between configurations (what names a configuration in the results)."""
    keys = {k for s in settings for k in s}
    return {k for k in keys if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in settings}) > 1}


def _best(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    return max(candidates, key=lambda c: (c["holdout"], -c["peft_params"]))


# --- running -------------------------------------------------------------------------------------------------------


def run_sweep(config: RunConfig, members: list[Member], spec: SweepSpec, resume: bool = False) -> Path | None:
    """Train every configuration in one run (`run.train_tasks`), choose on the held-out part of the training split,
    measure the chosen ones on the evaluation split, and write sweep.json, sweep.md and figures/sweep_<task>.png.

    Returns the run directory (None in the non-main processes of a data-parallel run).
    """
    from .run import train_tasks

    trained = train_tasks(config, resume)
    if trained is None:
        return None
    model, run, summary = trained
    results = select(model, config, members, summary["diverged"])
    results["train_time_s"] = round(summary["seconds"], 1)
    results["sweep"] = spec.to_dict()
    write_results(results, run.path)
    return run.path


def select(
    model: Any, config: RunConfig, members: list[Member], diverged: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Held-out metric of every configuration (one pass per task over its held-out images), the best overall and
    per family, and the evaluation-split metric of those chosen. Ties go to fewer PEFT parameters. Configurations
    that diverged in training ({name: step}) are listed with their step and never chosen."""
    diverged = dict(diverged or {})
    from .outputs import output_kind
    from .ppt import ppt
    from .tasks import evaluate_tasks

    by_task: dict[str, list[Member]] = {}
    for m in members:
        by_task.setdefault(m.task, []).append(m)
    out: dict[str, Any] = {"backbone": config.backbone.name, "tasks": {}}
    for task, group in by_task.items():
        spec: TaskSpec = config.tasks[group[0].name]
        metric = output_kind(spec.head).primary_metric
        names = [m.name for m in group]
        start = time.perf_counter()
        held = spec.data.dataset(HOLDOUT, train=False, backbone=model.data_config)
        scores = evaluate_tasks(model, names, held)
        rows = []
        for m in group:
            params = model.num_parameters(m.name)
            value = max(0.0, float(scores[m.name][metric]))
            rows.append(
                {
                    "name": m.name,
                    "family": m.family,
                    "settings": m.settings,
                    "holdout": value,
                    "peft_params": params["peft"],
                    "head_params": params["head"],
                    "ppt": ppt(value, params["peft"]),
                    **({"diverged_at_step": diverged[m.name]} if m.name in diverged else {}),
                }
            )
        finite = [r for r in rows if "diverged_at_step" not in r]
        winner = _best(finite) if finite else None
        families = dict.fromkeys(r["family"] for r in finite)
        per_family = {f: _best([r for r in finite if r["family"] == f]) for f in families}
        chosen = list(dict.fromkeys([*([winner["name"]] if winner else []), *(r["name"] for r in per_family.values())]))
        evaluation = spec.data.dataset(spec.data.eval_split, train=False, backbone=model.data_config)
        tested = evaluate_tasks(model, chosen, evaluation) if chosen else {}
        for r in rows:
            if r["name"] in tested:
                r["eval"] = max(0.0, float(tested[r["name"]][metric]))
                r["eval_ppt"] = ppt(r["eval"], r["peft_params"])
        out["tasks"][task] = {
            "metric": metric,
            "holdout_images": len(held),
            "eval_images": len(evaluation),
            "configs": rows,
            "best": winner["name"] if winner else None,
            "best_by_family": {f: r["name"] for f, r in per_family.items()},
            "select_time_s": round(time.perf_counter() - start, 1),
        }
    return out


def format_results(results: Mapping[str, Any]) -> str:
    """sweep.md: per task, every configuration with its held-out metric, parameters and PPT; the chosen ones with
    their evaluation-split metric."""
    timing = f", training {results['train_time_s']} s" if "train_time_s" in results else ""
    lines = [f"backbone: {results['backbone']}{timing}"]
    for task, r in results["tasks"].items():
        metric = r["metric"]
        lines += [
            "",
            f"## {task}",
            "",
            f"Chosen on {r['holdout_images']} held-out training images ({metric}); the chosen configurations measured "
            f"on the {r['eval_images']} evaluation images. "
            + (f"Best: **{r['best']}**." if r["best"] else "Every configuration diverged."),
            "",
            f"| configuration | family | settings | held-out {metric} | PEFT params | PPT | eval {metric} |",
            "|---|---|---|---|---|---|---|",
        ]
        chosen = set(r["best_by_family"].values())
        for row in sorted(r["configs"], key=lambda c: -c["holdout"]):
            settings = ", ".join(f"{k}={_fmt(v)}" for k, v in row["settings"].items()) or "-"
            name = f"**{row['name']}**" if row["name"] == r["best"] else row["name"]
            mark = " (family best)" if row["name"] in chosen and row["name"] != r["best"] else ""
            if "diverged_at_step" in row:
                mark = f" (diverged at step {row['diverged_at_step']}: not chosen)"
            test = f"{100 * row['eval']:.2f} %" if "eval" in row else ""
            lines.append(
                f"| {name}{mark} | {row['family']} | {settings} | {100 * row['holdout']:.2f} % | "
                f"{row['peft_params']:,} | {row['ppt']:.3f} | {test} |"
            )
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def write_results(results: Mapping[str, Any], out: Path) -> None:
    """sweep.json, sweep.md (with the figures linked) and figures/sweep_<task>.png (held-out metric vs PEFT
    parameters, one colour per family; needs matplotlib, else left out with a warning as in the run report)."""
    import importlib.util
    import warnings

    from .report import FIGURES_DIR, MATPLOTLIB_MISSING

    out = Path(out)
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    text = format_results(results)
    if importlib.util.find_spec("matplotlib") is None:
        warnings.warn(MATPLOTLIB_MISSING, stacklevel=2)
    else:
        (out / FIGURES_DIR).mkdir(exist_ok=True)
        for task, r in results["tasks"].items():
            rel = f"{FIGURES_DIR}/sweep_{task}.png"
            plot_sweep(r, task, out / rel)
            text += f"\n![{task}: held-out {r['metric']} vs PEFT parameters]({rel})\n"
    (out / RESULTS_MD).write_text(text)


def plot_sweep(r: Mapping[str, Any], task: str, path: Path) -> None:
    """Held-out metric against PEFT parameters (symmetric log axis: a linear probe has none), one colour per
    family, the chosen configuration circled."""
    from .report import _figure, _save

    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    families = list(dict.fromkeys(c["family"] for c in r["configs"]))
    for k, family in enumerate(families):
        rows = [c for c in r["configs"] if c["family"] == family and "diverged_at_step" not in c]
        ax.scatter(
            [c["peft_params"] for c in rows], [100 * c["holdout"] for c in rows], label=family, color=f"C{k % 10}"
        )
    lost = [c for c in r["configs"] if "diverged_at_step" in c]
    if lost:
        xs, ys = [c["peft_params"] for c in lost], [100 * c["holdout"] for c in lost]
        ax.scatter(xs, ys, marker="x", color="black", label="diverged")
    best = next((c for c in r["configs"] if c["name"] == r["best"]), None)
    if best is not None:
        x, y = best["peft_params"], 100 * best["holdout"]
        ax.scatter([x], [y], s=220, facecolors="none", edgecolors="black")
        ax.annotate(best["name"], (x, y), textcoords="offset points", xytext=(8, -12))
    top = max(c["peft_params"] for c in r["configs"])
    ax.set_xscale("symlog", linthresh=max(1.0, 10 ** math.floor(math.log10(max(top, 1)) - 3)))
    ax.set_xlabel("trainable PEFT parameters (head excluded)")
    ax.set_ylabel(f"held-out {r['metric']} (%)")
    ax.set_title(f"sweep of {task}: {len(r['configs'])} configurations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
