#!/usr/bin/env bash
# The pinned CPU virtualenv of megatron-omni: create it once, reuse it after, optionally run a command in it.
#
#   bash tools/setup_env.sh                            # create/check only; silent when already set up
#   bash tools/setup_env.sh python -m pytest tests     # ... then run the command inside the venv
#
# Location: $OMNI_VENV, default ${XDG_CACHE_HOME:-~/.cache}/megatron-omni/venv-<hash of the pins>, outside
# the clone so fresh clones (CI) reuse it.  A venv counts as complete only once its marker file holds the
# current hash; otherwise it is (re)installed.  Needs Python >= 3.10 ($OMNI_PYTHON, default python3) and
# network access to PyPI; the first run downloads ~5 GB (torch 2.11 CUDA wheels, which also run on CPU).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${OMNI_PYTHON:-python3}"
# Explicit pins: a bare `torch` could resolve to a local CPU build that breaks torchvision/torchaudio.
TORCH_PINS=(torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0)
CONSTRAINTS="$REPO/requirements/constraints.txt"
# Test-only: FunASR's SANMEncoder + WavFrontend, the SAN-M reference of tests/models/test_sanm_funasr.py.
# Installed --no-deps: its ~25 declared requirements are never imported on that path (the encoder needs torch
# only; the test stands in for the frontend's librosa import).  Kept out of the hash: bumping it updates the
# existing venv in place instead of rebuilding it.
FUNASR_PIN="funasr==1.4.16"

HASH="$({ echo "${TORCH_PINS[*]}"; cat "$REPO/setup.py" "$CONSTRAINTS"; } | sha256sum | cut -c1-12)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/megatron-omni"
VENV="${OMNI_VENV:-$CACHE/venv-$HASH}"
MARKER="$VENV/.megatron-omni-ready"
LOG="$VENV.install.log"

say() { echo "setup_env: $*" >&2; }

ensure_venv() {
    [[ -f "$MARKER" && "$(cat "$MARKER")" == "$HASH" ]] && return 0
    mkdir -p "$(dirname "$VENV")"
    if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" && -n "$(ls -A "$VENV")" ]]; then
        say "$VENV exists and is not a virtualenv; set OMNI_VENV to another path"; return 1
    fi
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { say "$PY is older than Python 3.10"; return 1; }
    if [[ ! -f "$MARKER" ]]; then   # never completed: start clean (a stale marker = pins changed: upgrade in place)
        say "creating $VENV (first run: ~2 min, ~6 GB download)"
        "$PY" -m venv --clear "$VENV"
    else
        say "pins changed; updating $VENV"
        rm -f "$MARKER"
    fi
    local pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS")
    if ! { "${pip[@]}" --upgrade pip setuptools wheel &&
           "${pip[@]}" "${TORCH_PINS[@]}" -e "$REPO[dev]" &&
           (cd / && "$VENV/bin/python" -c "import torch, torchvision, torchaudio, megatron.core, megatron_omni, pytest_timeout"); } >"$LOG" 2>&1
    then
        tail -n 40 "$LOG" >&2; say "install failed; full log: $LOG"; return 1
    fi
    echo "$HASH" >"$MARKER"
    rm -f "$LOG"
    # Default-location venvs of older pins, unused for 14 days, are ~6 GB each: drop them.
    # (`|| true`: under `set -e -o pipefail` an empty match list would otherwise abort the caller.)
    if [[ -z "${OMNI_VENV:-}" ]]; then
        find "$CACHE" -maxdepth 2 -name .megatron-omni-ready -mtime +14 -printf '%h\n' \
            | { grep -vxF "$VENV" || true; } | xargs -r rm -rf
    fi
    return 0
}

# Idempotent: also installs into an already-complete venv that lacks it (or has another version).
ensure_funasr() {
    local have
    have="$(cd / && "$VENV/bin/python" -c 'from importlib.metadata import version; print(version("funasr"))' 2>/dev/null || true)"
    [[ "funasr==$have" == "$FUNASR_PIN" ]] && return 0
    if ! { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$FUNASR_PIN" &&
           (cd / && "$VENV/bin/python" -c "from funasr.models.sanm.encoder import SANMEncoder"); } >"$LOG" 2>&1
    then
        tail -n 40 "$LOG" >&2; say "install of the test-only $FUNASR_PIN (--no-deps) failed; full log: $LOG"; return 1
    fi
    rm -f "$LOG"
}

# The cached venv is shared by clones; its editable install must point at *this* checkout.
ensure_editable() {
    local where
    where="$(cd / && "$VENV/bin/python" -c 'import megatron_omni, os; print(os.path.dirname(os.path.dirname(os.path.realpath(megatron_omni.__file__))))' 2>/dev/null || true)"
    [[ "$where" == "$REPO" ]] && return 0
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$REPO" >"$LOG" 2>&1 \
        || { tail -n 40 "$LOG" >&2; say "editable install of $REPO failed; full log: $LOG"; return 1; }
    rm -f "$LOG"
}

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9 2>/dev/null || true   # serialise concurrent jobs sharing the venv (best effort without flock)
ensure_venv
ensure_funasr
ensure_editable
touch "$MARKER"
exec 9>&-

if (($#)); then
    export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
    unset PYTHONHOME
    exec "$@"
fi
