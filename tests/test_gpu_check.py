"""The CPU mode of the GPU check (issue 15): benchmarks/gpu_check.py, the new mixed_batch variants and
scripts/gpu_check.sh run here, small, so that a GPU run spends no device time on a broken script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", **env)
    environment.pop("MULTITASK_PEFT_KERNELS", None)
    proc = subprocess.run(args, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_gpu_check_cpu_mode(tmp_path: Path) -> None:
    """Training through Triton (interpreter) equals the torch path; the server answers every request right."""
    pytest.importorskip("fastapi")
    _run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path)], 240)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] and set(result["checks"]) == {"training_float32", "trainer_fit", "server"}

    training = result["checks"]["training_float32"]
    assert training["ok"] and len(training["steps"]) >= 2
    for step in training["steps"]:
        assert step["grad_rel_diff_max"] <= training["tolerance"] == 1e-3
        assert not step["params_without_grad"] and not step["params_with_zero_grad"]
        assert set(step["grad_rel_diff_by_task"]) == {"lora", "ssf", "pfeiffer"}
    assert training["param_rel_diff_after_max"] <= 1e-3
    assert training["triton_ops"] == ["bottleneck", "lora", "scale_shift"]  # the Triton path really ran
    assert all(key.endswith(":triton") for key in training["kernel_calls"])

    trainer = result["checks"]["trainer_fit"]
    assert trainer["ok"] and trainer["param_rel_diff_max"] <= 1e-3 and "lora" in trainer["triton_ops"]

    server = result["checks"]["server"]
    assert server["ok"] and server["all_200"] and server["statuses"] == {"200": server["requests"]}
    assert server["bad_count"] == 0 and server["logit_max_abs_diff"] <= 1e-4
    assert server["served_tasks"] == ["lora", "pfeiffer", "ssf"] and server["device_reported"]["device"] == "cpu"
    assert 0 < server["latency_ms"]["p50"] <= server["latency_ms"]["p99"] and server["req_per_s"] > 0


def test_mixed_batch_loop_and_mixed_ranks(tmp_path: Path) -> None:
    """The one-task-at-a-time loop and mixed ranks: parity first (all equal), host times recorded."""
    pytest.importorskip("peft")
    out = tmp_path / "mixed.json"
    args = ["--quick", "--tasks", "5", "--ranks", "4", "8", "16", "32", "64", "--repeats", "1", "--warmup", "0"]
    _run([sys.executable, "benchmarks/mixed_batch.py", *args, "--json", str(out)], 180)
    result = json.loads(out.read_text())
    assert result["config"]["task_ranks"] == [4, 8, 16, 32, 64]
    parity = result["parity_max_abs_diff"]
    assert max(parity["mixed"], parity["mixed_torch_path"], parity["one_task_at_a_time"]) < 1e-4
    variants = {v["id"]: v for v in result["variants"].values()}
    assert {"backbone", "ours", "hf_mixed", "loop"} <= set(variants)
    assert all(v["host_median_s"] > 0 and len(v["host_times_s"]) == 1 for v in variants.values())
    assert result["ours_vs_one_task_at_a_time"] > 0


def test_gpu_check_script_parses_and_lists_its_steps() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    _run([bash, "-n", str(SCRIPT)], 30)
    proc = _run([bash, str(SCRIPT), "--cpu", "--dry-run"], 60, PYTHON=sys.executable)
    steps = [line.split()[0] for line in proc.stdout.splitlines()[1:] if line.strip()]
    assert steps == [
        "environment",
        "bandwidth",
        "install",
        "pytest_gpu",
        "test_kernels",
        "gpu_check",
        "mixed_batch",
        "mixed_ranks",
    ]


@pytest.mark.slow
def test_gpu_check_script_cpu_mode(tmp_path: Path) -> None:
    """The whole script in its CPU mode: every step passes and at most 8 files come out."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    _run([bash, str(SCRIPT), "--cpu", "--out", str(tmp_path)], 1200, PYTHON=sys.executable)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and all(s["status"] == "ok" for s in summary["steps"]), summary
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {"gpu_check.json", "mixed_batch.json", "mixed_batch_ranks.json"} <= set(files)
