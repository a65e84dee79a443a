"""Shared fixtures and hooks for the napari-masksam tests.

* ``shared_data``: the project's shared data folder ``../shared/data`` next to
  the repository; tests that use it are skipped when it is absent.
* ``torch.compile`` caches (inductor) go to a fresh folder per test session, removed at the end:
  tests compile from scratch, as on a new machine, and leave no cache behind.
* Tests marked ``gui`` need napari, a Qt binding and a display (Xvfb under
  ``scripts/test.sh``). Without them they are skipped -- unless the environment
  variable ``MASKSAM_REQUIRE_GUI=1`` is set (``scripts/test.sh`` and CI set
  it), in which case they FAIL, so that GUI tests can never pass silently
  by being skipped.

Heavy imports (torch, napari, Qt) stay out of this module: collection stays fast.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

REQUIRE_GUI_ENV = "MASKSAM_REQUIRE_GUI"


def _require_gui() -> bool:
    return os.environ.get(REQUIRE_GUI_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


_INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"
_own_cache: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _own_cache
    if _INDUCTOR_CACHE not in os.environ:  # subprocesses (torchrun, the CLI) inherit it
        _own_cache = os.environ[_INDUCTOR_CACHE] = tempfile.mkdtemp(prefix="masksam-inductor-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _own_cache is not None:
        os.environ.pop(_INDUCTOR_CACHE, None)
        shutil.rmtree(_own_cache, ignore_errors=True)


# --------------------------------------------------------------------------- #
# fixtures


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the shared data folder ``<repo>/../shared/data``; skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found: {SHARED_DATA} (expected next to the repository)")
    return SHARED_DATA


# --------------------------------------------------------------------------- #
# gui tests: skip, or fail under MASKSAM_REQUIRE_GUI=1


def _display_problem() -> str | None:
    """Why no usable display is available, or None when there is one."""
    if not sys.platform.startswith("linux"):
        return None  # macOS and Windows always have a window system
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform.startswith("offscreen") or platform.startswith("minimal"):
        return f"QT_QPA_PLATFORM={platform} has no OpenGL for napari's canvas; unset it and use Xvfb"
    if os.environ.get("WAYLAND_DISPLAY"):
        return None
    display = os.environ.get("DISPLAY", "")
    if not display:
        return "no display: DISPLAY is not set (install Xvfb and pytest-xvfb, or run under xvfb-run)"
    match = re.fullmatch(r":(\d+)(?:\.\d+)?", display)
    if match and not Path(f"/tmp/.X11-unix/X{match.group(1)}").exists():
        return f"no X server listening on DISPLAY={display}"
    return None


def _gui_problem() -> str | None:
    """Why gui tests cannot run here, or None when they can."""
    for module in ("napari", "qtpy", "pytestqt"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[all,dev]')"
    if not any(importlib.util.find_spec(b) for b in ("PyQt6", "PyQt5", "PySide6", "PySide2")):
        return "no Qt binding is installed (PyQt6, PyQt5, PySide6 or PySide2)"
    return _display_problem()


_GUI_SKIP_REASON = re.compile(r"display|xvfb|\bqt|pyqt|pyside|qapplication|napari|vispy|opengl|\bgl\b", re.I)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Runs before any fixture: creating a QApplication without a display
    # aborts the whole test process, so check first.
    if item.get_closest_marker("gui") is None:
        return
    problem = _gui_problem()
    if problem is None:
        # Tests call masksam_core directly after a viewer exists; load triton first, as the widgets do.
        from napari_masksam._compat import load_triton_beside_mesa

        load_triton_beside_mesa()
        return
    if _require_gui():
        pytest.fail(f"gui test cannot run and {REQUIRE_GUI_ENV}=1: {problem}", pytrace=False)
    pytest.skip(f"gui test: {problem}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # A gui test may also skip itself (importorskip("napari"), a fixture that
    # finds no display, ...): under MASKSAM_REQUIRE_GUI=1 such skips are failures.
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and _require_gui() and item.get_closest_marker("gui")):
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if _GUI_SKIP_REASON.search(reason):
        report.outcome = "failed"
        report.longrepr = f"gui test skipped but {REQUIRE_GUI_ENV}=1 forbids it: {reason}"
