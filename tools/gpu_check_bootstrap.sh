#!/usr/bin/env bash
# Bootstrap a bare GPU machine (torch + CUDA only, no network) for tools/gpu_check.py, then run it.
#
#   bash tools/gpu_check_bootstrap.sh --out DIR [--quick] [gpu_check.py flags ...]
#
# Installs every wheel of a local folder with pip --no-index --no-deps into /tmp/gpu_check_site
# (nothing is fetched: the machine may have no network), puts it and the repo on PYTHONPATH, checks
# that what the checks import is importable, and runs `python3 tools/gpu_check.py "$@"`.
# Wheel folder: $GPU_WHEELS, else gpu_wheels/, else .whl/ (both git-ignored).  Fill it, on a machine
# with network, for the target's Python (here 3.12) with:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d gpu_wheels megatron-core==0.16.1 pyyaml sentencepiece
#
# megatron-core (pure Python apart from a small helper extension) is the only package a stock
# torch image lacks; pyyaml (configs) and sentencepiece (the demo tokenizer) are checked below
# (numpy, packaging and Pillow come with torch / torchvision).  Transformer Engine, apex, DALI and PyAV are optional: the
# checks that need them are skipped with the reason.  The H200 device of this project's sessions
# already has pyyaml, sentencepiece, tensorboard, transformers and Pillow, so megatron-core
# alone is enough there (3 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."

wheels="${GPU_WHEELS:-}"
if [[ -z "$wheels" ]]; then
  for d in gpu_wheels .whl; do
    if compgen -G "$d/*.whl" > /dev/null; then wheels="$d"; break; fi
  done
fi
site=/tmp/gpu_check_site
if [[ -n "$wheels" ]] && compgen -G "$wheels/*.whl" > /dev/null; then
  echo "gpu_check_bootstrap: installing $(ls "$wheels"/*.whl | wc -l) wheel(s) from $wheels into $site"
  python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
      --target "$site" "$wheels"/*.whl
else
  echo "gpu_check_bootstrap: no wheels (GPU_WHEELS, gpu_wheels/ or .whl/); using what is installed"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the CUDA paths fail loudly rather than fall back silently; megatron wants this for TP overlap
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

# What the check path imports (logs/<group>.imports.json of a run lists every module it loaded).
python3 - <<'PY'
import importlib, sys
required = {"torch": "torch", "numpy": "numpy", "packaging": "packaging", "yaml": "pyyaml",
            "sentencepiece": "sentencepiece", "megatron.core": "megatron-core", "PIL": "pillow"}
missing = []
for module, dist in required.items():
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{dist} ({type(e).__name__}: {e})")
if missing:
    sys.exit("gpu_check_bootstrap: missing " + "; ".join(missing)
             + " -- add their wheels to gpu_wheels/ (see the pip download line in this script)")
import megatron.core, torch
print(f"gpu_check_bootstrap: torch {torch.__version__} CUDA {torch.version.cuda} "
      f"({torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}), "
      f"megatron-core {megatron.core.__version__}")
PY
exec python3 tools/gpu_check.py "$@"
