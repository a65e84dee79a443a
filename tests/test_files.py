"""Atomic writes and image suffixes (masksam_core.files), and the progress-generator drivers."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from masksam_core.files import (
    atomic_path,
    atomic_save,
    atomic_save_npy,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    split_suffix,
)
from masksam_core.progress import drive, relay


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_content_and_permissions(tmp_path):
    path = tmp_path / "sub" / "out.bin"  # the folder is created
    with atomic_write(path) as handle:
        handle.write(b"\x00\x01data")
    assert path.read_bytes() == b"\x00\x01data"
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~_umask()
    atomic_write_text(tmp_path / "t.txt", "a\nb\r\n")
    assert (tmp_path / "t.txt").read_bytes() == b"a\nb\r\n"  # newlines as given
    atomic_write_json(tmp_path / "d.json", {"x": [1, 2]})
    assert (tmp_path / "d.json").read_text() == json.dumps({"x": [1, 2]}, indent=2) + "\n"
    atomic_save_npy(tmp_path / "a.npy", np.arange(6).reshape(2, 3).T)
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.arange(6).reshape(2, 3).T)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "d.json", "plain.bin", "sub", "t.txt"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_atomic_write_keeps_the_old_file_and_no_temporary_on_error(tmp_path, error):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(error), atomic_write(path, "w") as handle:
        handle.write("new, half")
        raise error("stop")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with pytest.raises(ValueError, match="not 'ab'"), atomic_write(path, "ab"):
        pass
    with pytest.raises(TypeError):  # a value JSON cannot hold: nothing written
        atomic_write_json(path, {"x": object()})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_keeps_the_suffix_for_writers_that_take_a_name(tmp_path):
    with atomic_path(tmp_path / "seg.nii.gz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".seg.") and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    assert (tmp_path / "seg.nii.gz").read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]


def test_atomic_save_round_trips_with_torch(tmp_path):
    import torch

    atomic_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))


def test_split_suffix():
    assert split_suffix("a/scan.nii.gz") == ("scan", ".nii.gz")
    assert split_suffix("SCAN.NII.GZ") == ("SCAN", ".NII.GZ")
    assert split_suffix("stack.tiff") == ("stack", ".tiff")
    assert split_suffix("case.v2.nii") == ("case.v2", ".nii")
    assert split_suffix("notes.txt") == ("notes", ".txt")


def _job(n: int):
    yield from range(n)
    return "result"


def test_drive_returns_the_result_calls_on_item_and_cancels():
    seen: list[int] = []
    assert drive(_job(3), seen.append) == "result" and seen == [0, 1, 2]
    gen = _job(5)
    assert drive(gen, seen.append, cancel=lambda: len(seen) >= 4) is None and seen == [0, 1, 2, 0]
    assert gen.gi_frame is None  # closed


def test_relay_converts_items_passes_the_result_and_closes_on_cancel():
    def outer(stop):
        result = yield from relay(_job(3), lambda i: i * 10, stop)
        return result

    seen: list[int] = []
    assert drive(outer(None), seen.append) == "result" and seen == [0, 10, 20]
    inner = _job(3)
    stopped = relay(inner, cancel=lambda: True)
    assert drive(stopped) is None and inner.gi_frame is None
    inner = _job(3)
    outer_gen = relay(inner)
    next(outer_gen)
    outer_gen.close()  # closing the outer job closes the inner one
    assert inner.gi_frame is None
