"""The OpenAPI document tells the truth: schemathesis, with every check, against a live server.

Every status code and content type the server sends must be documented, every request the document calls valid
must be accepted (`tests/schemathesis.toml` says the one exception: image bytes that do not decode), and no
generated request may cause a 5xx. The default run is small and seeded; the `slow` one runs many more cases.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from test_serving import LiveServer, _build, _engine  # noqa: E402

CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _, root = _build(tmp_path_factory.mktemp("openapi"))
    with LiveServer(_engine(root, max_batch=8), max_body_bytes=2**20) as server:
        yield server


def _schemathesis(url: str, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", f"{url}/openapi.json"]
    command += ["--checks", "all", "--workers", "1", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=1200)


def test_schemathesis_all_checks(live: LiveServer) -> None:
    run = _schemathesis(live.url, "--max-examples", "40", "--seed", "1")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = run.stdout.split("SUMMARY")[-1]
    assert re.search(r"generated, \d+ passed", summary) and "Failures:" not in summary, summary


@pytest.mark.slow
def test_schemathesis_all_checks_long(live: LiveServer) -> None:
    run = _schemathesis(live.url, "--max-examples", "1000")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
