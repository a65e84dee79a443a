"""Packaging: the napari manifest, the wheel, the extras and the plugin in napari."""

from __future__ import annotations

import configparser
import importlib.metadata as md
import importlib.util
import os
import stat
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[1]
DIST_NAME = "napari-masksam"
ROOT_MANIFEST = REPO_ROOT / "napari.yaml"
QT_BINDINGS = {"pyqt5", "pyqt6", "pyside2", "pyside6"}
# napari's extras that install a Qt binding
NAPARI_QT_EXTRAS = QT_BINDINGS | {"all", "qt", "pyqt", "pyside", "optional"}


def _npe2(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "npe2", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=300,
    )


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _pulls_qt(requirement: str) -> bool:
    req = Requirement(requirement)
    name = req.name.lower().replace("_", "-")
    extras = {e.lower() for e in req.extras}
    return name in QT_BINDINGS or (name == "napari" and bool(extras & NAPARI_QT_EXTRAS))


# --------------------------------------------------------------------------- #
# (a) the installed plugin's manifest


def test_npe2_validate_installed_plugin():
    result = _npe2("validate", DIST_NAME, "--imports")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout.lower()


def test_npe2_finds_the_manifest_shipped_in_the_package():
    from npe2 import PluginManifest

    entry_points = [ep for ep in md.distribution(DIST_NAME).entry_points if ep.group == "napari.manifest"]
    assert [(ep.name, ep.value) for ep in entry_points] == [(DIST_NAME, "napari_masksam:napari.yaml")]

    # npe2 resolves "module:file" as <package folder>/file (PluginManifest._from_entrypoint)
    spec = importlib.util.find_spec("napari_masksam")
    assert spec is not None and spec.submodule_search_locations
    shipped = [Path(loc) / "napari.yaml" for loc in spec.submodule_search_locations]
    shipped = [p for p in shipped if p.exists()]
    assert len(shipped) == 1, shipped
    assert shipped[0].parent.name == "napari_masksam"
    assert shipped[0].read_bytes() == ROOT_MANIFEST.read_bytes()

    found = PluginManifest.from_distribution(DIST_NAME)
    from_file = PluginManifest.from_file(shipped[0])
    assert found.name == DIST_NAME
    exclude = {"package_metadata"}
    assert found.model_dump(exclude=exclude) == from_file.model_dump(exclude=exclude)
    assert found.package_metadata is not None
    assert found.package_metadata.version == md.version(DIST_NAME)


def test_source_manifest_is_linked_into_the_package():
    link = REPO_ROOT / "src" / "napari_masksam" / "napari.yaml"
    assert link.is_symlink(), "src/napari_masksam/napari.yaml should link to ../../napari.yaml"
    assert link.resolve() == ROOT_MANIFEST.resolve()


# --------------------------------------------------------------------------- #
# (b) a regular wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A regular (non-editable) wheel, built with this environment's setuptools
    # (no build isolation, so nothing is downloaded).
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "--disable-pip-version-check", "--wheel-dir", str(out), str(REPO_ROOT),
        ],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    wheels = list(out.glob("napari_masksam-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _dist_info(zf: zipfile.ZipFile, name: str) -> str:
    matches = [n for n in zf.namelist() if n.endswith(f".dist-info/{name}") and n.count("/") == 1]
    assert len(matches) == 1, (name, matches)
    return zf.read(matches[0]).decode("utf-8")


@pytest.mark.slow
def test_wheel_ships_manifest_as_real_file(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo("napari_masksam/napari.yaml")
        mode = info.external_attr >> 16
        assert not stat.S_ISLNK(mode), "napari.yaml is stored as a symlink in the wheel"
        assert zf.read(info) == ROOT_MANIFEST.read_bytes()
        assert "napari_masksam/__init__.py" in zf.namelist()
        assert "masksam_core/__init__.py" in zf.namelist()


@pytest.mark.slow
def test_wheel_metadata_and_entry_points(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        entry_points = configparser.ConfigParser()
        entry_points.optionxform = str  # keep names as written
        entry_points.read_string(_dist_info(zf, "entry_points.txt"))
        metadata = Parser().parsestr(_dist_info(zf, "METADATA"))

    assert entry_points["console_scripts"]["masksam-core"].strip() == "masksam_core.cli:main"
    assert entry_points["napari.manifest"][DIST_NAME].strip() == "napari_masksam:napari.yaml"
    assert metadata["Name"] == DIST_NAME
    assert "Framework :: napari" in metadata.get_all("Classifier", [])


@pytest.mark.slow
def test_npe2_validates_manifest_extracted_from_wheel(wheel: Path, tmp_path: Path):
    with zipfile.ZipFile(wheel) as zf:
        zf.extract("napari_masksam/napari.yaml", tmp_path)
    extracted = tmp_path / "napari_masksam" / "napari.yaml"
    assert extracted.is_file() and not extracted.is_symlink()
    result = _npe2("validate", str(extracted))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout.lower()


@pytest.mark.slow
def test_wheel_declares_qt_only_in_all_extra(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        metadata = Parser().parsestr(_dist_info(zf, "METADATA"))
    base, extra_all = [], []
    for line in metadata.get_all("Requires-Dist", []):
        req = Requirement(line)
        marker = str(req.marker) if req.marker else ""
        if 'extra == "all"' in marker:
            extra_all.append(line)
        elif "extra ==" not in marker:
            base.append(line)
    assert not [r for r in base if _pulls_qt(r)], base
    assert any(_pulls_qt(r) for r in extra_all), extra_all


# --------------------------------------------------------------------------- #
# (c) Qt only through the `all` extra


def test_default_dependencies_have_no_qt_binding():
    dependencies = _pyproject()["project"]["dependencies"]
    offending = [r for r in dependencies if _pulls_qt(r)]
    assert not offending, f"default dependencies must not install a Qt binding: {offending}"


def test_all_extra_installs_a_qt_binding():
    extra_all = _pyproject()["project"]["optional-dependencies"]["all"]
    assert any(_pulls_qt(r) for r in extra_all), extra_all


def test_installed_metadata_matches_pyproject():
    declared = md.requires(DIST_NAME) or []
    base = [r for r in declared if "extra ==" not in r]
    assert not [r for r in base if _pulls_qt(r)], base
    assert any(_pulls_qt(r) for r in declared if 'extra == "all"' in r), declared


# --------------------------------------------------------------------------- #
# (d) napari knows the plugin


@pytest.mark.gui
@pytest.mark.slow
def test_napari_viewer_knows_the_plugin(make_napari_viewer):
    import numpy as np
    from npe2 import PluginManager

    viewer = make_napari_viewer(show=True)
    pm = PluginManager.instance()
    assert DIST_NAME in pm, sorted(m.name for m in pm.iter_manifests())
    manifest = pm.get_manifest(DIST_NAME)
    assert manifest.display_name == "MaskSAM"

    # napari's OpenGL canvas really renders under the (virtual) display
    viewer.add_image(np.full((32, 32), 200, dtype=np.uint8), colormap="gray", contrast_limits=(0, 255))
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[-1] == 4
    centre = shot[shot.shape[0] // 2, shot.shape[1] // 2, :3]
    assert np.all(np.abs(centre.astype(int) - 200) <= 2), centre
