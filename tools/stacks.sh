#!/usr/bin/env bash
# The stack matrix: mmrest tested in OpenMMLab environments that users already have.
#
#   bash tools/stacks.sh env  NAME     create (once, then cached) the environment NAME
#   bash tools/stacks.sh test NAME     create it if needed, then run the tests it allows
#
# NAME:
#   classic      Python 3.9, torch 2.1.2, numpy 1.26, mmengine 0.10.4, mmcv-lite 2.1.0,
#                mmdet 3.3.0, mmsegmentation 1.2.2, mmpretrain 1.2.0
#   onedl        Python 3.12, torch 2.10.0, numpy 2, the OneDL fork (onedl-mmengine
#                0.10.12, onedl-mmdetection 3.5.1, onedl-mmsegmentation 1.4.2,
#                onedl-mmpretrain 1.3.6) and onedl-mmcv 2.3.6 (its Python code: pip's
#                isolated build has no torch, so it compiles no ops)
#   upstream     Python 3.10, torch 2.4.1 (the newest with upstream prebuilt mmcv), numpy
#                1.26, mmengine 0.10.7, mmcv-lite 2.1.0, the upstream toolboxes
#   onedl-lite   onedl with mmcv-lite 2.2.0 instead of onedl-mmcv
#   classic-ops  classic with mmcv 2.1.0 built with its ops for torch 2.1.2 (about 20 min
#                on 2 cores the first time, then cached): the detector and segmentor steps
#
# None of these has compiled ops, so `test classic`, `test upstream`, `test onedl` and
# `test onedl-lite` run the tests marked `stack` (backbones, exactness, checkpoints, safe
# loading, configs, classifier, plain `pip install .` leaving the stack unchanged);
# `test classic-ops` adds those marked `ops`.
# Environments live in MMREST_STACKS (default ~/.cache/mmrest/stacks), apart from the
# repository and from the pinned .venv of `make install`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${MMREST_STACKS:-$HOME/.cache/mmrest/stacks}"
cache="${MMREST_WHEEL_CACHE:-$HOME/.cache/mmrest/wheels}"
log() { printf '[stacks] %s\n' "$*" >&2; }

cmd="${1:-}"
name="${2:-}"
case "$name" in
  classic|classic-ops)
    python="$HOME/.pyenv/versions/3.9.18/bin/python"
    stack=(torch==2.1.2 torchvision==0.16.2 numpy==1.26.4 mmengine==0.10.4 "setuptools<70")
    toolboxes=(mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0)
    mmcv=mmcv-lite==2.1.0
    if [[ "$name" == classic-ops ]]; then mmcv="mmcv==2.1.0 with ops"; fi
    extra=(scikit-image==0.22.0)
    ;;
  upstream)
    python="$HOME/.pyenv/versions/3.10.13/bin/python"
    stack=(torch==2.4.1 torchvision==0.19.1 numpy==1.26.4 mmengine==0.10.7 "setuptools<70")
    toolboxes=(mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0)
    mmcv=mmcv-lite==2.1.0
    extra=(scikit-image==0.24.0)
    ;;
  onedl|onedl-lite)
    python="$HOME/.pyenv/versions/3.12.1/bin/python"
    stack=(torch==2.10.0 torchvision==0.25.0 "numpy>=2,<3" onedl-mmengine==0.10.12 "setuptools<70")
    toolboxes=(onedl-mmdetection==3.5.1 onedl-mmsegmentation==1.4.2 onedl-mmpretrain==1.3.6)
    mmcv=onedl-mmcv==2.3.6
    if [[ "$name" == onedl-lite ]]; then mmcv=mmcv-lite==2.2.0; fi
    extra=(scikit-image==0.24.0)
    ;;
  *)
    echo "usage: bash tools/stacks.sh env|test classic|upstream|onedl|onedl-lite|classic-ops" >&2
    exit 2
    ;;
esac
[[ "$cmd" == env || "$cmd" == test ]] || { echo "usage: bash tools/stacks.sh env|test NAME" >&2; exit 2; }

# what the toolboxes import but install with --no-deps (their own requirements would pull
# upstream mmcv or mmengine over the stack)
toolbox_needs=(pycocotools scipy shapely terminaltables matplotlib ftfy regex prettytable rich
               opencv-python-headless addict yapf termcolor tqdm six
               importlib_metadata mat4py modelindex einops)
venv="$root/$name"
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check -q)
spec="${stack[*]} | $mmcv | ${toolboxes[*]} | ${toolbox_needs[*]} | ${extra[*]} | $name"
stamp="$venv/.stack"

if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$spec" ]]; then
  [[ -x "$python" ]] || { log "$name needs $python (pyenv)"; exit 1; }
  rm -rf "$venv"
  log "creating $venv ($name)"
  "$python" -m venv "$venv"
  "${pip[@]}" install "${stack[@]}"
  if [[ "$name" == classic-ops ]]; then
    # mmcv 2.1.0 with its ops, built once against this torch and cached
    wheel_dir="$cache/torch-2.1.2-py39"
    whl="$(ls "$wheel_dir"/mmcv-2.1.0-*.whl 2>/dev/null | head -n 1 || true)"
    if [[ -z "$whl" ]]; then
      log "building mmcv 2.1.0 with ops against torch 2.1.2 (first time only, ~20 min)"
      "${pip[@]}" install wheel ninja psutil
      mkdir -p "$wheel_dir"
      MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "${pip[@]}" wheel --no-build-isolation --no-deps --no-binary mmcv -w "$wheel_dir" mmcv==2.1.0
      whl="$(ls "$wheel_dir"/mmcv-2.1.0-*.whl | head -n 1)"
    fi
    "${pip[@]}" install --no-deps "$whl"
  else
    "${pip[@]}" install --no-deps "$mmcv"
  fi
  # mmcv's own plain needs (mmcv-lite is installed without its requirements)
  "${pip[@]}" install addict packaging Pillow pyyaml yapf "opencv-python-headless<4.11"
  "${pip[@]}" install --no-deps "${toolboxes[@]}"
  "${pip[@]}" install "${toolbox_needs[@]}" pytest hypothesis "${extra[@]}"
  echo "$spec" > "$stamp"
fi

if [[ "$cmd" == test ]]; then
  cd "$repo"
  marks="stack and not ops and not slow"
  [[ "$name" == classic-ops ]] && marks="stack or ops"
  log "$name: $("$py" -c 'import sys, torch, numpy, mmengine, mmcv
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}, mmengine {mmengine.__version__}, mmcv {mmcv.__version__}")')"
  # only the modules that mark tests for the matrix: the others may import what these
  # environments do not have (onnx, mmcv's ops)
  mapfile -t files < <(grep -l -E 'pytest\.mark\.(stack|ops)' tests/test_*.py)
  # every parameter value of each test on every stack, not every combination (the
  # pinned stack runs them all)
  "$py" -m pytest "${files[@]}" -m "$marks" --each-value-once -p no:cacheprovider
fi
