"""Output paths the file system refuses give one clear line on every command, never a traceback.

Checked with ``masksam_core.cli.main`` (as the ``masksam-core`` command runs it): a file in the way of
the output folder, a file as a parent of it, and a folder given as a model file's name. Nothing is
created where the command refused.
"""

from __future__ import annotations

import numpy as np
import pytest

from masksam_core.cli import main
from masksam_core.errors import MaskSAMError, check_output_folder
from masksam_core.io import ImageGeometry, write_image
from runs import write_tiny_run


@pytest.fixture
def blocker(tmp_path):
    path = tmp_path / "afile"
    path.write_text("in the way")
    return path


def _run(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    return err


def test_commands_refuse_output_folders_that_cannot_be_made(tmp_path, blocker, capsys):
    run = write_tiny_run(tmp_path / "run")
    scan = tmp_path / "scan.nii.gz"
    write_image(scan, np.zeros((4, 8, 8), np.float32), ImageGeometry.from_spacing((4, 8, 8)))
    err = _run(["train", str(tmp_path), "--out", str(blocker), "--preset", "tiny"], capsys)
    assert f"--out {blocker} is a file, not a folder" in err
    err = _run(["train", str(tmp_path), "--out", str(blocker / "run"), "--preset", "tiny"], capsys)
    assert f"{blocker} is a file, so the folder cannot be made" in err
    err = _run(["predict", "-i", str(scan), "-o", str(blocker / "sub"), "-m", str(run)], capsys)
    assert f"-o {blocker / 'sub'}: {blocker} is a file" in err
    err = _run(["export", str(run), "-o", str(blocker / "model.pt")], capsys)
    assert f"{blocker} is a file" in err
    err = _run(["export", str(run), "-o", str(tmp_path)], capsys)
    assert f"{tmp_path} is a folder: give the model file's name" in err
    err = _run(["demo", "--out", str(blocker)], capsys)
    assert f"--out {blocker} is a file, not a folder" in err
    assert blocker.read_text() == "in the way"


def test_check_output_folder(tmp_path, blocker):
    check_output_folder(tmp_path / "new" / "deeper", "--out")  # can be made: fine, and nothing is made
    assert not (tmp_path / "new").exists()
    check_output_folder(tmp_path, "--out")
    with pytest.raises(MaskSAMError, match="is a file, not a folder"):
        check_output_folder(blocker, "--out")


def test_out_of_range_numbers_are_refused_up_front(tmp_path, capsys):
    run = write_tiny_run(tmp_path / "run")
    scan = tmp_path / "scan.nii.gz"
    write_image(scan, np.zeros((4, 8, 8), np.float32), ImageGeometry.from_spacing((4, 8, 8)))
    assert "--num-classes -3: counts the background too" in _run(["info", "--preset", "tiny", "--num-classes", "-3"],
                                                                 capsys)
    assert "--in-channels 0" in _run(["info", "--preset", "tiny", "--in-channels", "0"], capsys)
    for flag, value in (("--step-size", "0"), ("--step-size", "1.5"), ("--batch-size", "0")):
        err = _run(["predict", "-i", str(scan), "-o", str(tmp_path / "out"), "-m", str(run), flag, value], capsys)
        assert f"{flag} {float(value) if 'step' in flag else int(value)}: give" in err
    assert not (tmp_path / "out").exists()  # refused before any case was read or folder made
    err = _run(["export", str(run), "-o", str(tmp_path / "model.nii.gz")], capsys)
    assert "name the model file .pt (e.g." in err and not (tmp_path / "model.nii.gz").exists()
