# shellcheck shell=bash
# Shared set-up for scripts/test.sh and scripts/demo.sh -- source it, don't run it.
#
# Creates (or reuses) the virtual environment .venv at the repository root:
#   1. torch and torchvision, pinned (installed first so that no other
#      requirement can pull in a different build),
#   2. the project itself, editable, with the extras given in MASKSAM_EXTRAS
#      (default: all,lite,dev).
# A stamp inside .venv records a hash of pyproject.toml, this file, the pins,
# the extras, the Python version and the .venv path; when any of them changes
# the install steps run again (pip keeps what is already satisfied, so a rerun
# is quick). An interrupted install leaves no stamp and is redone next time.
#
# Afterwards: REPO_ROOT, VENV and VENV_PY are set and .venv/bin is first on PATH.
# Settable from outside: PYTHON (interpreter that creates the venv, default
# python3), MASKSAM_VENV (default REPO_ROOT/.venv), MASKSAM_EXTRAS.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MASKSAM_SETUP_FILE="$REPO_ROOT/scripts/_setup_env.sh"
VENV="${MASKSAM_VENV:-$REPO_ROOT/.venv}"
VENV_PY="$VENV/bin/python"
MASKSAM_PYTHON="${PYTHON:-python3}"
MASKSAM_EXTRAS="${MASKSAM_EXTRAS:-all,lite,dev}"
MASKSAM_TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
MASKSAM_STAMP="$VENV/.masksam-setup.sha256"

masksam_log() { echo "==> $*"; }

# Quiet pip; also drops the "Location ... is ignored" lines that a local
# extra-index without some package folders makes pip print once per package.
masksam_pip_install() {
    "$VENV_PY" -m pip install --quiet --progress-bar off --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

masksam_setup_hash() {
    {
        cat "$REPO_ROOT/pyproject.toml" "$MASKSAM_SETUP_FILE"
        echo "pins=${MASKSAM_TORCH_PINS[*]} extras=$MASKSAM_EXTRAS venv=$VENV"
        "$VENV_PY" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

masksam_setup_venv() {
    local t0=$SECONDS
    if [[ -d "$VENV" ]] && ! "$VENV_PY" -c 'import sys' >/dev/null 2>&1; then
        masksam_log "Removing broken virtual environment $VENV"
        rm -rf "$VENV"
    fi
    if [[ ! -d "$VENV" ]]; then
        command -v "$MASKSAM_PYTHON" >/dev/null 2>&1 || {
            echo "error: '$MASKSAM_PYTHON' not found; install Python >= 3.10 or set PYTHON=/path/to/python3" >&2
            return 1
        }
        masksam_log "Creating virtual environment $VENV with $("$MASKSAM_PYTHON" -V 2>&1)"
        "$MASKSAM_PYTHON" -m venv "$VENV"
    fi

    local want have=""
    want="$(masksam_setup_hash)"
    [[ -f "$MASKSAM_STAMP" ]] && have="$(cat "$MASKSAM_STAMP")"
    if [[ "$want" == "$have" ]]; then
        masksam_log "Reusing $VENV (requirements unchanged)"
    else
        rm -f "$MASKSAM_STAMP"
        masksam_log "Installing ${MASKSAM_TORCH_PINS[*]} (several GB: minutes the first time)"
        masksam_pip_install "${MASKSAM_TORCH_PINS[@]}"
        masksam_log "Installing napari-masksam (editable) with extras [$MASKSAM_EXTRAS]"
        # Keep the pins while the other requirements resolve.
        masksam_pip_install -e "$REPO_ROOT[$MASKSAM_EXTRAS]" "${MASKSAM_TORCH_PINS[@]}"
        echo "$want" >"$MASKSAM_STAMP"
        masksam_log "Environment ready in $((SECONDS - t0)) s"
    fi
    export VIRTUAL_ENV="$VENV"
    export PATH="$VENV/bin:$PATH"
}
