"""Files on disk: the image file suffixes, and writes that never leave a half-written file.

Suffixes: ``.nii.gz`` counts as one suffix, so ``scan.nii.gz`` has the stem ``scan`` (a case name,
a layer name, the stem of the ``scan.classes.json`` sidecar).

Atomic writes: every file MaskSAM writes goes to a temporary file in the target's folder (created
with :func:`tempfile.mkstemp`, so concurrent writers never share one), is flushed to the disk
(``fsync``), gets the permissions a plain ``open()`` would give a new file (``0o666`` less the
umask, not mkstemp's ``0o600``) and is renamed onto the target with :func:`os.replace`. A reader
sees the old file or the new one, never a part; on any error, ``KeyboardInterrupt`` included, the
temporary file is removed and an existing target is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "TIFF_SUFFIXES",
    "atomic_path",
    "atomic_save",
    "atomic_save_npy",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "is_image_name",
    "split_suffix",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES


def split_suffix(path: str | os.PathLike) -> tuple[str, str]:
    """(stem, suffix) of ``path``'s name with an image suffix as one (``.nii.gz``, any case kept);
    other names split at their last dot (``notes.txt`` -> ``('notes', '.txt')``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return Path(name).stem, Path(name).suffix


def is_image_name(path: str | os.PathLike) -> bool:
    """Whether ``path``'s name ends with a NIfTI or TIFF suffix (any case)."""
    return Path(path).name.lower().endswith(IMAGE_SUFFIXES)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` with its suffix, for writers that take a file name (nibabel,
    tifffile, matplotlib); renamed onto ``path`` when the block ends without an error.

    The folder is created when missing. See the module doc for what is guaranteed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = split_suffix(path)
    fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # the writer may have closed it without syncing
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that only replaces ``path`` when the block ends without an error.

    ``mode`` is ``'wb'`` or ``'w'`` (``open_kwargs`` such as ``encoding``, ``newline`` go to
    :func:`open`). The handle is flushed and synced before the rename.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle
        handle.flush()


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (newlines as given)."""
    with atomic_write(path, "w", encoding=encoding, newline="") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, newline: bool = True,
                      **dumps_kwargs: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically; ``newline`` ends the file with one."""
    atomic_write_text(path, json.dumps(data, indent=indent, **dumps_kwargs) + ("\n" if newline else ""))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (checkpoints, model files)."""
    import torch

    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_save_npy(path: str | os.PathLike, array: Any) -> None:
    """``numpy.save`` of ``array`` (C order) to ``path`` atomically (the preprocessed cache)."""
    import numpy as np

    with atomic_write(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
