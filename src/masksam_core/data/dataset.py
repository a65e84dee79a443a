"""The nnU-Net v2 raw data-set layout, its validation, and ``masksam-core check``.

A data set is a folder ``DatasetXXX_Name`` holding ``dataset.json`` (``channel_names`` {"0": "CT"},
``labels`` {name: int}, ``file_ending``), ``imagesTr/{case}_{XXXX}{ending}`` (one file per channel
XXXX) and ``labelsTr/{case}{ending}``. Files are NIfTI or 3D TIFF (see :mod:`masksam_core.io`).

:func:`check_dataset` reads headers first (shapes, affines) and voxel data only for the deep checks
(corrupt data, NaN/inf, label values, empty label maps); cases are checked in parallel threads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MaskSAMError
from ..files import IMAGE_SUFFIXES
from ..io import ImageGeometry, compare_geometry, read_geometry, read_image

__all__ = ["Case", "DatasetError", "DatasetSpec", "Problem", "add_cli", "check_dataset",
           "load_checked_dataset", "load_dataset"]

REQUIRED_KEYS = ("channel_names", "labels", "file_ending")
LAYOUT = ("dataset.json with channel_names, labels and file_ending, imagesTr/{case}_{XXXX}{ending}, "
          "labelsTr/{case}{ending} (nnU-Net v2 raw layout)")
_IMAGE_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetError(MaskSAMError):
    """A data set is missing, malformed, or fails :func:`check_dataset`."""


@dataclass(frozen=True)
class Problem:
    """One problem of a data set: the file concerned and what is wrong and how to fix it."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Case:
    """One training case; ``images`` are the expected paths, one per channel (they may be missing)."""

    id: str
    images: list[Path]
    label: Path | None


@dataclass
class DatasetSpec:
    """A parsed nnU-Net v2 raw data set."""

    root: Path
    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str
    cases: list[Case]

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def class_names(self) -> list[str]:
        """Class names indexed by label value (``class_names[0]`` is the background)."""
        by_value = {v: k for k, v in self.labels.items()}
        if sorted(by_value) != list(range(len(self.labels))):
            raise DatasetError(f"{self.root / 'dataset.json'}: {_consecutive_message(self.labels)}")
        return [by_value[v] for v in range(len(by_value))]


def _consecutive_message(labels: dict[str, int]) -> str:
    return (f"label values {sorted(labels.values())} are not consecutive from 0; number the "
            f"labels 0..{len(labels) - 1} (0 = background) and relabel the label maps to match")


# --------------------------------------------------------------------------- dataset.json


def _parse_json(root: Path) -> tuple[dict[str, Any] | None, list[Problem]]:
    """(the fields of a DatasetSpec except cases, or None; problems that prevent parsing)."""
    path = root / "dataset.json"
    if not root.is_dir():
        return None, [Problem(root, f"data set folder not found; give a folder holding {LAYOUT}")]
    if not path.is_file():
        return None, [Problem(path, f"missing; create it (keys channel_names, labels, file_ending; "
                                    f"layout: {LAYOUT})")]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        return None, [Problem(path, f"not valid JSON ({error}); fix the syntax")]
    if not isinstance(meta, dict):
        return None, [Problem(path, "must hold a JSON object {...}; see the nnU-Net v2 layout")]
    problems = []
    for key in REQUIRED_KEYS:
        if key not in meta:
            hint = " (nnU-Net v1's 'modality' is called 'channel_names' in v2)" if (
                key == "channel_names" and "modality" in meta) else ""
            example = {"channel_names": '{"0": "CT"}', "labels": '{"background": 0, "liver": 1}',
                       "file_ending": '".nii.gz"'}[key]
            problems.append(Problem(path, f"missing key '{key}'{hint}; add e.g. \"{key}\": {example}"))
    if problems:
        return None, problems
    channels, labels, ending = meta["channel_names"], meta["labels"], meta["file_ending"]
    if not isinstance(channels, dict) or not channels or sorted(channels) != [
            str(i) for i in range(len(channels))]:
        problems.append(Problem(path, f"channel_names must map \"0\", \"1\", ... to names, e.g. "
                                      f"{{\"0\": \"CT\"}}; got {channels!r}"))
    if not isinstance(labels, dict) or not labels or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        problems.append(Problem(path, "labels must map each class name to one integer, e.g. "
                                      f"{{\"background\": 0, \"liver\": 1}} (region lists are not "
                                      f"supported); got {labels!r}"))
    if not isinstance(ending, str) or ending.lower() not in IMAGE_SUFFIXES:
        problems.append(Problem(path, f"file_ending {ending!r} is not supported; use \".nii.gz\", "
                                      "\".nii\", \".tif\" or \".tiff\" (convert the files first)"))
    if problems:
        return None, problems
    fields = {"root": root, "name": root.resolve().name, "labels": dict(labels), "file_ending": ending,
              "channel_names": {int(k): str(v) for k, v in channels.items()},
              "num_training": meta.get("numTraining")}
    return fields, []


def _label_problems(root: Path, labels: dict[str, int]) -> list[Problem]:
    values = sorted(labels.values())
    if values == list(range(len(values))):
        return []
    return [Problem(root / "dataset.json", _consecutive_message(labels))]


def _find_cases(root: Path, ending: str, num_channels: int) -> tuple[list[Case], list[Problem]]:
    """The cases in imagesTr/labelsTr (sorted by id), and problems with file names."""
    problems: list[Problem] = []
    image_cases: set[str] = set()
    label_cases: set[str] = set()
    for folder, found in (("imagesTr", image_cases), ("labelsTr", label_cases)):
        directory = root / folder
        if not directory.is_dir():
            problems.append(Problem(directory, f"folder missing; create it ({LAYOUT})"))
            continue
        for path in sorted(directory.iterdir()):
            name = path.name
            if name.startswith(".") or name.endswith(".json"):  # hidden files, sidecars
                continue
            if not name.endswith(ending):
                problems.append(Problem(path, f"does not end with file_ending '{ending}' of "
                                              f"dataset.json; convert it to {ending} or fix file_ending"))
                continue
            stem = name[: -len(ending)]
            if folder == "labelsTr":
                found.add(stem)
                continue
            match = _IMAGE_NAME.match(stem)
            if match is None:
                problems.append(Problem(path, f"image names must be {{case}}_{{XXXX}}{ending} with a "
                                              f"4-digit channel, e.g. {stem}_0000{ending}; rename it"))
            elif int(match["channel"]) >= num_channels:
                problems.append(Problem(path, f"channel {match['channel']} but dataset.json "
                                              f"channel_names has {num_channels}; remove the file or "
                                              "add the channel to channel_names"))
            else:
                found.add(match["case"])
    cases = [Case(case, [root / "imagesTr" / f"{case}_{c:04d}{ending}" for c in range(num_channels)],
                  root / "labelsTr" / f"{case}{ending}" if case in label_cases else None)
             for case in sorted(image_cases | label_cases)]
    return cases, problems


def load_dataset(root: str | os.PathLike) -> DatasetSpec:
    """Parse ``root/dataset.json`` and list the cases; raises DatasetError when that is impossible."""
    root = Path(root)
    fields, problems = _parse_json(root)
    if fields is None:
        raise DatasetError("\n".join(str(p) for p in problems))
    fields.pop("num_training")
    cases, _ = _find_cases(root, fields["file_ending"], len(fields["channel_names"]))
    return DatasetSpec(cases=cases, **fields)


# --------------------------------------------------------------------------- checks


def _problem(path: Path, error: MaskSAMError) -> Problem:
    message = str(error)
    return Problem(path, message[len(f"{path}: "):] if message.startswith(f"{path}: ") else message)


def _geometries(spec: DatasetSpec, case: Case) -> tuple[dict[Path, ImageGeometry], list[Problem]]:
    """Headers of a case's files, and problems of missing, unreadable or misaligned files."""
    problems: list[Problem] = []
    ending = spec.file_ending
    present = [p for p in case.images if p.is_file()]
    if not present and case.label is not None:
        return {}, [Problem(case.label, f"label without image; add imagesTr/{case.id}_0000{ending} "
                                        "or remove the label")]
    for c, path in enumerate(case.images):
        if path not in present:
            problems.append(Problem(path, f"missing channel {c} ({spec.channel_names[c]}) of case "
                                          f"{case.id}; add the file or remove the case"))
    if case.label is None:
        problems.append(Problem(present[0], f"image without label; add labelsTr/{case.id}{ending} "
                                            "or move the case to imagesTs"))
    geometries = {}
    for path in present + ([case.label] if case.label else []):
        try:
            geometries[path] = read_geometry(path)
        except MaskSAMError as error:
            problems.append(_problem(path, error))
    reference = next((p for p in case.images if p in geometries), None)
    if reference is None:
        return geometries, problems
    ref = geometries[reference]
    for path, geometry in geometries.items():
        what = "label" if path == case.label else "channel"
        if path == reference:
            continue
        if geometry.shape != ref.shape:
            problems.append(Problem(path, f"{what} shape {geometry.shape} (Z, Y, X) differs from "
                                          f"{reference.name} {ref.shape}; put it on the image's "
                                          "voxel grid (resample or re-export it)"))
        elif (why := compare_geometry(geometry, ref)) is not None:
            problems.append(Problem(path, f"{what} geometry differs from {reference.name}: {why}; "
                                          "put it on the image's voxel grid (resample or fix the "
                                          "header)"))
    return geometries, problems


def _label_values(labels: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an integer label map (bincount when small and non-negative)."""
    if labels.size and labels.dtype.kind in "ub" and labels.dtype.itemsize <= 2:
        return np.flatnonzero(np.bincount(labels.ravel()))
    return np.unique(labels)


def _data_problems(spec: DatasetSpec, path: Path, is_label: bool) -> list[Problem]:
    """Deep checks of one file's voxels: readable, finite, and (labels) known, non-empty values."""
    try:
        data, _ = read_image(path)
    except MaskSAMError as error:
        return [_problem(path, error)]
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        fix = "relabel them" if is_label else "replace them (e.g. with the image minimum)"
        return [Problem(path, f"{nan} NaN and {inf} infinite voxels; {fix} before training")]
    if not is_label:
        return []
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            return [Problem(path, "label map has non-integer values; store integer class ids")]
        data = data.astype(np.int64)
    values = _label_values(data)
    unknown = sorted(set(values.tolist()) - set(spec.labels.values()))
    if unknown:
        return [Problem(path, f"label values {unknown} are not in dataset.json labels "
                              f"{sorted(spec.labels.values())}; add them to labels or fix the map")]
    if values.tolist() == [0]:
        return [Problem(path, "label map is empty (all background); label it or remove the case")]
    return []


def _check_case(spec: DatasetSpec, case: Case, deep: bool) -> list[Problem]:
    geometries, problems = _geometries(spec, case)
    if deep:
        for path in geometries:
            problems += _data_problems(spec, path, path == case.label)
    return problems


def check_dataset(root: str | os.PathLike, *, deep: bool = True,
                  workers: int | None = None) -> list[Problem]:
    """Every problem of the data set at ``root`` (empty when it is fine to train on).

    ``deep=False`` reads headers only (names, shapes, affines); ``deep=True`` also reads the voxels
    (corrupt data, NaN/inf, label values, empty label maps). ``workers`` threads check cases.
    """
    root = Path(root)
    fields, problems = _parse_json(root)
    if fields is None:
        return problems
    num_training = fields.pop("num_training")
    spec = DatasetSpec(cases=[], **fields)
    problems = _label_problems(root, spec.labels)
    cases, name_problems = _find_cases(root, spec.file_ending, spec.num_channels)
    spec.cases = cases
    problems += name_problems
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for case_problems in pool.map(lambda case: _check_case(spec, case, deep), cases):
            problems += case_problems
    if not cases and not name_problems:
        problems.append(Problem(root / "imagesTr", f"no cases: put each case's images in imagesTr as "
                                                   f"{{case}}_0000{spec.file_ending} and its labels in labelsTr as "
                                                   f"{{case}}{spec.file_ending}"))
    if not problems and isinstance(num_training, int) and num_training != len(cases):
        problems.append(Problem(root / "dataset.json", f"numTraining is {num_training} but the "
                                                       f"data set holds {len(cases)} case(s); fix "
                                                       "numTraining or add the missing cases"))
    return problems


def load_checked_dataset(root: str | os.PathLike, *, deep: bool = True) -> DatasetSpec:
    """:func:`load_dataset` after :func:`check_dataset`; raises DatasetError listing the problems."""
    problems = check_dataset(root, deep=deep)
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DatasetError(f"the data set {root} has {len(problems)} problem(s); fix them first "
                           f"(masksam-core check {root} lists them all):\n{shown}{more}")
    return load_dataset(root)


# --------------------------------------------------------------------------- command line


def _summary(root: Path, problems: list[Problem]) -> str:
    name = root.resolve().name
    if problems:
        return f"{name}: {len(problems)} problem{'s' * (len(problems) != 1)} found"
    spec = load_dataset(root)
    n, c = len(spec.cases), spec.num_channels
    channels = ", ".join(spec.channel_names[i] for i in range(c))
    return (f"{name}: {n} case{'s' * (n != 1)}, {c} channel{'s' * (c != 1)} ({channels}), "
            f"{spec.num_classes} classes: OK")


def _cli_check(args: argparse.Namespace) -> int:
    root = Path(args.dataset)
    problems = check_dataset(root, deep=not args.quick)
    for problem in problems:
        print(problem)
    print(_summary(root, problems))
    return 1 if problems else 0


def add_cli(subparsers: Any) -> None:
    """Register ``masksam-core check DATASET_DIR``."""
    parser = subparsers.add_parser(
        "check", help="validate a data set (nnU-Net v2 raw layout) before training",
        description="Validate a data set in the nnU-Net v2 raw layout: " + LAYOUT + ". Checked: "
        "dataset.json (present, valid JSON, keys, label values consecutive from 0, supported "
        "file_ending, numTraining); file names and endings; a label and every channel file for each "
        "case; readable headers; image/label and channel/channel shape and geometry (spacing, "
        "origin, directions) agreement; and, unless --quick, the voxels: corrupt or truncated data, "
        "NaN or infinite values, label values missing from dataset.json, empty (all background) "
        "label maps. Prints one line per problem naming the file and the fix, then a summary; "
        "exits with status 0 when the data set is fine, 1 otherwise.")
    parser.add_argument("dataset", metavar="DATASET_DIR", help="data set folder holding dataset.json")
    parser.add_argument("--quick", action="store_true",
                        help="read file headers only (skip the voxel checks; much faster)")
    parser.set_defaults(func=_cli_check)
