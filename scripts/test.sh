#!/usr/bin/env bash
# Runs every test of napari-masksam on a fresh Debian machine (this is what CI runs).
#
#   ./scripts/test.sh                  # the whole suite
#   ./scripts/test.sh -x -q tests/test_packaging.py -m "not slow"   # arguments go to pytest
#
# pytest runs from the repository root: give test paths relative to it.
#
# Steps: system packages for a virtual X display (Xvfb + Mesa + Qt's xcb
# libraries; apt only when something is missing), the .venv (see
# scripts/_setup_env.sh), lint (ruff) and type checks (mypy), then pytest
# under Xvfb. A lint or type error stops the script (status 1) before pytest;
# otherwise it exits with pytest's status.
set -euo pipefail

# shellcheck source=scripts/_setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"
cd "$REPO_ROOT"

# --- 1. system packages for napari under a virtual display -----------------
APT_PACKAGES=(
    xvfb libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-cursor0
    libxcb-icccm4 libxcb-keysyms1 libxcb-shape0 libxcb-render-util0 libxcb-image0
    libxcb-xinerama0 libdbus-1-3
)
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
elif ! command -v Xvfb >/dev/null 2>&1; then
    missing=("${APT_PACKAGES[@]}")
fi
if ((${#missing[@]} == 0)); then
    masksam_log "System packages for Xvfb/napari already present"
else
    masksam_log "Installing system packages: ${missing[*]}"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: apt-get not found; install Xvfb, Mesa (GL/EGL) and Qt's xcb libraries by hand" >&2
        exit 1
    fi
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
    if ((EUID != 0)); then
        if command -v sudo >/dev/null 2>&1; then
            apt=(sudo "${apt[@]}")
        else
            echo "error: not root and sudo is not available; as root run: apt-get install ${missing[*]}" >&2
            exit 1
        fi
    fi
    "${apt[@]}" update -qq
    "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- 2. Python environment ---------------------------------------------------
masksam_setup_venv

# --- 3. lint and types ------------------------------------------------------
masksam_log "Running ruff check src tests benchmarks scripts"
if ! "$VENV/bin/ruff" check src tests benchmarks scripts; then
    echo "error: lint step failed (ruff check src tests benchmarks scripts): fix the findings above" >&2
    exit 1
fi
masksam_log "Running mypy (settings in pyproject.toml)"
if ! "$VENV/bin/mypy"; then
    echo "error: type-check step failed (mypy): fix the errors above" >&2
    exit 1
fi

# --- 4. tests ----------------------------------------------------------------
# GUI tests must run, never be skipped for lack of a display (tests/conftest.py).
export MASKSAM_REQUIRE_GUI=1
# Qt's offscreen platform has no OpenGL for napari's canvas; use the X display.
if [[ "${QT_QPA_PLATFORM:-}" == offscreen ]]; then
    masksam_log "Unsetting QT_QPA_PLATFORM=offscreen (napari's GL canvas needs Xvfb)"
    unset QT_QPA_PLATFORM
fi

# pytest-xvfb (dev extra) starts Xvfb for the session and sets DISPLAY;
# xvfb-run is the fallback when the plugin is not importable.
if "$VENV_PY" -c 'import pytest_xvfb' >/dev/null 2>&1; then
    masksam_log "Running pytest under Xvfb (pytest-xvfb): pytest $*"
    runner=()
else
    masksam_log "Running pytest under xvfb-run: pytest $*"
    runner=(xvfb-run -a -s "-screen 0 1280x1024x24")
fi
status=0
"${runner[@]}" "$VENV_PY" -m pytest "$@" || status=$?
masksam_log "pytest exited with status $status"
exit "$status"
