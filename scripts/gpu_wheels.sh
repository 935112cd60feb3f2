#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (repo root; ignored by git through .git/info/exclude), for
# scripts/gpu_check.sh: Python 3.12, x86-64 manylinux, no dependencies resolved, one version of each. The machine
# has torch, triton, timm, torchvision, peft, onnx, onnxruntime, prometheus-client, httpx, anyio, h11, click,
# annotated-doc, safetensors, scikit-image and tensorboard (see the device notes' package list); these are the
# project's runtime imports (core + `serve` extra) that it does not have. Versions: those tested together here.
#
#     bash scripts/gpu_wheels.sh            # then: run scripts/gpu_check.sh on the device with carry [".whl"]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"
WHEELS=(
    pycocotools==2.0.11
    fastapi==0.165.0
    starlette==1.10.0
    uvicorn==0.54.0
    python-multipart==0.0.34
    pydantic==2.13.4
    pydantic-core==2.46.4
    annotated-types==0.7.0
    typing-inspection==0.4.2
    typing-extensions==4.16.0
    opentelemetry-api==1.45.2  # fastapi imports it
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
for wheel in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$wheel"
done
ls -l .whl
du -sh .whl
