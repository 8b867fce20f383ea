#!/usr/bin/env bash
# Create ./.venv and install the pinned OpenMMLab stack plus mmrest (editable).
#
# Idempotent: re-running only installs what is missing. mmcv 2.1.0 has no wheel for
# torch 2.14, so it is built once from its source release (with -std=c++20, which the
# torch 2.14 headers need) and the built wheel is kept in a cache outside the repo
# (MMREST_WHEEL_CACHE, default ~/.cache/mmrest/wheels) so later installs take seconds.
#
# Environment:
#   MMREST_VENV         virtual environment folder (default: <repo>/.venv)
#   MMREST_WHEEL_CACHE  where the built mmcv wheel is kept (default: ~/.cache/mmrest/wheels)
#   MAX_JOBS            parallel compile jobs for mmcv (default: number of cores)
#   PYTHON              the interpreter that creates the environment (default: python3;
#                       Python 3.11 or newer, with its venv module and headers, and a C++
#                       compiler for mmcv)
#   FORCE_CUDA=1        build mmcv's CUDA ops too (a CUDA torch and nvcc needed); such
#                       wheels are cached apart from the CPU-only ones
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MMREST_VENV:-$repo/.venv}"
cache="${MMREST_WHEEL_CACHE:-$HOME/.cache/mmrest/wheels}"
py="${PYTHON:-python3}"
stamp="$venv/.mmrest-installed"
req="$repo/requirements/stack.txt"
deploy_req="$repo/requirements/deploy.txt"

if [[ -f "$stamp" && "$stamp" -nt "$req" && "$stamp" -nt "$repo/requirements/torch.txt" && "$stamp" -nt "$repo/requirements/constraints.txt" && "$stamp" -nt "$repo/setup.py" && "$stamp" -nt "$deploy_req" ]]; then
  exit 0
fi

log() { printf '[install] %s\n' "$*" >&2; }

if [[ ! -x "$venv/bin/python" ]]; then
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    log "$py is not Python 3.11 or newer (the pinned stack needs it); set PYTHON=python3.11"
    exit 1
  fi
  log "creating virtual environment $venv"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
constraints=(-c "$repo/requirements/constraints.txt")

# torch first: it declares setuptools>=77, which is then pinned back below 70 because mmcv's
# setup.py and mmengine's `pkg::` config lookup import pkg_resources (gone in setuptools>=70).
torch_req="$repo/requirements/torch.txt"
if ! "$venv/bin/python" - "$torch_req" <<'PY' 2>/dev/null
import sys, importlib.metadata as md
for line in open(sys.argv[1]):
    line = line.split('#')[0].strip()
    if line:
        name, ver = line.split('==')
        assert md.version(name).split('+')[0] == ver, name
PY
then
  "${pip[@]}" install -q -r "$torch_req"
fi
# pip's complaint that torch wants setuptools>=77 is expected; any failure is not
if ! out="$("${pip[@]}" install -q "${constraints[@]}" wheel ninja psutil "setuptools<70" 2>&1)"; then
  printf '%s\n' "$out" >&2
  log "installing the build tools (wheel, ninja, psutil, setuptools<70) failed"
  exit 1
fi
printf '%s\n' "$out" | grep -v "requires setuptools>=77" \
  | grep -v "dependency resolver does not currently" | grep -v '^$' >&2 || true
torch_ver="$("$venv/bin/python" -c 'import torch;print(torch.__version__.split("+")[0])')"

if ! "$venv/bin/python" -c "import mmcv, mmcv._ext; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  # CPU-only and CUDA builds of mmcv are different wheels: a CUDA build (FORCE_CUDA=1, or
  # a visible GPU, which is when mmcv's setup.py compiles its CUDA ops) is cached apart
  ops="$("$venv/bin/python" -c 'import os, torch
cuda = torch.version.cuda and (os.environ.get("FORCE_CUDA") == "1" or torch.cuda.is_available())
print(f"-cuda{torch.version.cuda}" if cuda else "")')"
  wheel_dir="$cache/torch-$torch_ver-py$("$venv/bin/python" -c 'import sys;print(f"{sys.version_info[0]}{sys.version_info[1]}")')$ops"
  mkdir -p "$wheel_dir"
  whl="$(ls "$wheel_dir"/mmcv-2.1.0-*.whl 2>/dev/null | head -n 1 || true)"
  if [[ -z "$whl" ]]; then
    log "building mmcv 2.1.0 with ops against torch $torch_ver (first time only, ~20 min on 2 cores)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "${pip[@]}" download -q mmcv==2.1.0 --no-deps --no-binary :all: --no-build-isolation -d "$tmp"
    tar -xzf "$tmp"/mmcv-2.1.0.tar.gz -C "$tmp"
    sed -i 's/-std=c++17/-std=c++20/g' "$tmp/mmcv-2.1.0/setup.py"
    MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "${pip[@]}" wheel -q "${constraints[@]}" --no-build-isolation --no-deps -w "$tmp/dist" "$tmp/mmcv-2.1.0"
    cp "$tmp"/dist/mmcv-2.1.0-*.whl "$wheel_dir/"
    whl="$(ls "$wheel_dir"/mmcv-2.1.0-*.whl | head -n 1)"
  else
    log "using cached mmcv wheel $whl"
  fi
  "${pip[@]}" install -q "${constraints[@]}" "$whl"
fi

"${pip[@]}" install -q "${constraints[@]}" -r "$req"
# the deploy extra (onnx, onnxruntime, onnxscript), so that the export tests run
"${pip[@]}" install -q "${constraints[@]}" -r "$deploy_req"
"${pip[@]}" install -q "${constraints[@]}" --no-build-isolation --no-deps -e "$repo"
"$venv/bin/python" -c "import mmcv._ext, mmdet, mmseg, mmpretrain.models, mmrest, onnxruntime, onnxscript" \
  || { log "the installed stack does not import"; exit 1; }
touch "$stamp"
log "ready: $venv"
