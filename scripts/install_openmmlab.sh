#!/usr/bin/env bash
# Install the OpenMMLab extra: mmcv 2.1.0 with its C++ ops compiled against the torch already installed, then
# mmengine, mmdet and mmsegmentation. mmcv publishes no wheels for current torch and its sdist does not compile
# against current torch headers as shipped, so this script builds it from the PyPI sdist with two patches
# (C++20 instead of C++14/17; `pkg_resources`, gone from current setuptools, replaced by importlib.metadata and
# packaging) and caches the wheel per (torch, Python, platform, ops) so later runs install in seconds.
#
# Usage: scripts/install_openmmlab.sh            (about 13 minutes on 2 cores the first time)
#
# Environment:
#   PYTHON               interpreter to install into (default: python3)
#   MTPEFT_CACHE_DIR     wheel cache root (default: ${XDG_CACHE_HOME:-~/.cache}/multitask-peft)
#   MTPEFT_MMCV_CUDA=1   also compile the CUDA ops (needs nvcc matching torch's CUDA; default: CPU ops only)
#   MTPEFT_MMCV_SDIST    a local mmcv-2.1.0.tar.gz to build from instead of downloading it (offline machines)
#   MAX_JOBS             parallel compile jobs (default: number of cores)
set -euo pipefail

PYTHON=${PYTHON:-python3}
MMCV_VERSION=2.1.0
MMCV_SHA256=d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f
MMCV_URL=https://files.pythonhosted.org/packages/a7/19/f97f0fd4d432113a232e75f965335be6b7bb6557ae9faf8051e9a012cadd/mmcv-2.1.0.tar.gz
# Versions checked together with mmcv 2.1.0 (mmdet 3.3 and mmseg 1.2 require mmcv < 2.2).
PACKAGES=(mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2)
# Their run-time dependencies, installed explicitly: mmengine asks for opencv-python, which needs libGL; the
# headless build serves the same API without it.
DEPENDENCIES=(addict yapf "opencv-python-headless<5" matplotlib rich termcolor packaging six scipy
  ftfy regex shapely terminaltables prettytable "pycocotools>=2.0.8")

say() { echo "install_openmmlab: $*" >&2; }
die() { say "error: $*"; exit 1; }

torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null) \
  || die "torch is not importable with $PYTHON; install multitask-peft (and torch) first"
py_tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
platform=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_platform().replace("-", "_").replace(".", "_"))')
if [ "${MTPEFT_MMCV_CUDA:-0}" = 1 ]; then ops=cuda; else ops=cpu; fi
key="mmcv-$MMCV_VERSION-torch-${torch_version//+/_}-$py_tag-$platform-$ops"
cache="${MTPEFT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/multitask-peft}/openmmlab/$key"

build_wheel() {
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  if ! command -v c++ >/dev/null; then  # a C++ compiler (Debian: g++), installed when we are root
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "no C++ compiler: installing g++"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++
    else
      die "building mmcv's ops needs a C++ compiler (e.g. sudo apt-get install g++)"
    fi
  fi
  "$PYTHON" -c 'import os, sysconfig; assert os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
    || die "building mmcv's ops needs the Python headers (Debian: sudo apt-get install python3-dev)"
  "$PYTHON" -m pip install -q ninja "setuptools>=64" wheel packaging
  local sdist="$work/mmcv-$MMCV_VERSION.tar.gz"
  if [ -n "${MTPEFT_MMCV_SDIST:-}" ]; then
    cp "$MTPEFT_MMCV_SDIST" "$sdist"
  else
    say "downloading the mmcv $MMCV_VERSION sdist"
    "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$MMCV_URL" "$sdist" \
      || die "could not download $MMCV_URL; set MTPEFT_MMCV_SDIST to a local copy"
  fi
  echo "$MMCV_SHA256  $sdist" | sha256sum -c --quiet - || die "$sdist: sha256 differs from mmcv $MMCV_VERSION's"
  tar -xzf "$sdist" -C "$work"
  local src="$work/mmcv-$MMCV_VERSION"
  "$PYTHON" - "$src" "$torch_version" "$ops" <<'EOF'
import pathlib, sys
src, torch_version, ops = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
setup = src / "setup.py"
text = setup.read_text()
old = "from pkg_resources import DistributionNotFound, get_distribution, parse_version\n"
new = (
    "from importlib.metadata import PackageNotFoundError as DistributionNotFound, distribution as get_distribution\n"
    "from packaging.version import parse as parse_version\n"
)
if old not in text or "-std=c++17" not in text:
    sys.exit(f"{setup}: not the mmcv 2.1.0 setup.py this script patches")
text = text.replace(old, new).replace("-std=c++14", "-std=c++20").replace("-std=c++17", "-std=c++20")
setup.write_text(text)
# Shipped inside the wheel: what the ops were compiled against (multitask_peft checks it on import).
(src / "mmcv" / "_mtpeft_build.py").write_text(
    f'"""Written by multitask-peft\'s install_openmmlab.sh."""\nTORCH_VERSION = {torch_version!r}\nOPS = {ops!r}\n'
)
EOF
  local jobs=${MAX_JOBS:-$(nproc)}
  say "compiling mmcv $MMCV_VERSION ops ($ops) against torch $torch_version with $jobs jobs (about 13 min on 2 cores)"
  local log="$work/build.log" rc=0
  local -a env_ops=(FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=)
  [ "$ops" = cuda ] && env_ops=(FORCE_CUDA=1)
  (cd "$src" && env MMCV_WITH_OPS=1 MAX_JOBS="$jobs" "${env_ops[@]}" \
    "$PYTHON" -m pip wheel -v --no-build-isolation --no-deps -w "$work/dist" . >"$log" 2>&1) &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do  # progress: ninja's [done/total] every 30 s
    sleep 30
    step=$(grep -o '^ *\[[0-9]*/[0-9]*\]' "$log" | tail -1 | tr -d ' ' || true)
    [ -n "$step" ] && say "  compiled $step"
  done
  wait "$pid" || rc=$?
  if [ "$rc" -ne 0 ]; then
    tail -40 "$log" >&2
    die "building mmcv failed (exit $rc); the last lines of the log are above"
  fi
  mkdir -p "$cache"
  local built
  built=$(ls "$work"/dist/mmcv-*.whl)
  cp "$built" "$cache/.tmp.whl" && mv "$cache/.tmp.whl" "$cache/$(basename "$built")"  # no half-written wheel
  say "cached $(basename "$built") in $cache"
}

wheel=$(ls "$cache"/mmcv-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  build_wheel
  wheel=$(ls "$cache"/mmcv-*.whl | head -1)
else
  say "using the cached $wheel"
fi

"$PYTHON" -m pip install -q --no-deps --force-reinstall "$wheel"
"$PYTHON" -m pip install -q "${DEPENDENCIES[@]}"
"$PYTHON" -m pip install -q --no-deps "${PACKAGES[@]}"

# The check multitask_peft.integrations.openmmlab makes on import, plus the model zoos themselves.
"$PYTHON" - "$cache" <<'EOF' || die "the installed OpenMMLab packages do not work (see above); if the cached wheel is \
the cause, remove $cache and run this script again to rebuild it"
import sys
from multitask_peft.integrations.openmmlab import require_openmmlab
require_openmmlab()
import mmdet.models, mmseg.models  # noqa: E401,F401
print(f"install_openmmlab: mmcv ops, mmdet and mmseg import with this torch (wheel cache: {sys.argv[1]})")
EOF
