"""``masksam-core predict``: segment a file or a folder of scans with a trained run.

Inputs (``-i``):

* one image file; a name ``{case}_XXXX`` (nnU-Net) brings its sibling channels ``{case}_0000``,
  ``{case}_0001``, ... from the same folder;
* a folder: files named ``{case}_XXXX.nii.gz`` (also ``.nii``, ``.tif``, ``.tiff``) are grouped per
  case, channel ``XXXX`` in order, and need a ``_0000``; other image files are single-channel cases
  named by their stem (``scan.nii.gz`` → case ``scan``); subfolders holding DICOM files (``.dcm`` or
  names without a suffix) are DICOM series cases named by the folder; hidden files are ignored;
* a folder that directly holds one DICOM series.

Outputs (``-o``): ``{case}.nii.gz`` (``{case}.tif`` for TIFF inputs) with the input's geometry and a
``{case}.classes.json`` sidecar of class names; with ``--save-probabilities`` also ``{case}.npz``
(``probabilities`` float16 (C, Z, Y, X), ``class_names``, ``spacing`` (sz, sy, sx)). Every file is
written to a temporary name and renamed. A case whose outputs all exist is skipped unless
``--overwrite``. A case that fails is reported on one line (file and reason) and the others go on;
the exit status is 1 when any case failed.

Several processes: under ``torchrun --nproc_per_node=N -m masksam_core predict ...`` (``RANK`` and
``WORLD_SIZE`` set) case i of the sorted list goes to rank ``i % WORLD_SIZE``; every rank uses its
own GPU (``cuda:LOCAL_RANK``) and writes its own cases. No process group is needed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..devices import AMP_CHOICES, AMP_HELP, DEVICE_CHOICES, distributed_env
from ..errors import MaskSAMError, check_output_folder
from ..files import TIFF_SUFFIXES, atomic_write, is_image_name, split_suffix
from ..progress import drive

if TYPE_CHECKING:
    from .predictor import Predictor

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Case:
    """One case: its id, its channel files (or DICOM folder) in order, and a problem found while listing."""

    id: str
    files: list[Path]
    problem: str | None = field(default=None, compare=False)

    @property
    def source(self) -> Path:
        return self.files[0]

    @property
    def is_tiff(self) -> bool:
        return self.source.name.lower().endswith(TIFF_SUFFIXES)


# --------------------------------------------------------------------------- finding cases


def _split(path: Path) -> tuple[str, str]:
    """(stem, suffix) with ``.nii.gz`` as one suffix; suffix '' for non-images."""
    return split_suffix(path) if is_image_name(path) else (path.name, "")


def _looks_dicom(folder: Path) -> bool:
    """Whether ``folder`` directly holds a file that may be DICOM (``.dcm`` or no suffix)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.is_file() and not e.name.startswith(".") and
                       (e.name.lower().endswith(".dcm") or "." not in e.name) for e in entries)
    except OSError:
        return False


def _group(files: list[Path]) -> list[Case]:
    """Cases from image files: nnU-Net channel groups ({case}_0000, ...) and plain single-channel files."""
    groups: dict[str, dict[int, Path]] = {}
    twice: dict[str, list[Path]] = {}
    plain: list[Path] = []
    for f in files:
        m = _CHANNEL.match(_split(f)[0])
        if m:
            channels = groups.setdefault(m["case"], {})
            if int(m["channel"]) in channels:  # e.g. x_0000.nii.gz beside x_0000.tif
                twice.setdefault(m["case"], [channels[int(m["channel"])]]).append(f)
            channels[int(m["channel"])] = f
        else:
            plain.append(f)
    cases = []
    for cid, channels in groups.items():
        if cid in twice:
            names = ", ".join(f.name for f in twice[cid])
            match = _CHANNEL.match(_split(twice[cid][0])[0])
            assert match is not None  # only names with a channel suffix are in twice
            cases.append(Case(cid, [channels[i] for i in sorted(channels)],
                              problem=f"{twice[cid][0]}: {names} are all channel "
                                      f"{match['channel']} of case {cid}; "
                                      "keep one of them (move the others out of the input folder)"))
            continue
        if 0 not in channels:  # not nnU-Net naming after all: every file is its own case
            plain.extend(channels.values())
            continue
        ordered = [channels[i] for i in sorted(channels)]
        case = Case(cid, ordered)
        missing = [f"{cid}_{i:04d}" for i in range(max(channels) + 1) if i not in channels]
        if missing:
            case.problem = (f"{ordered[0]}: case {cid} lacks channel file(s) {', '.join(missing)}; channels "
                            "must be numbered _0000, _0001, ... without gaps")
        elif len({_split(f)[1].lower() for f in ordered}) > 1:
            case.problem = f"{ordered[0]}: the channels of case {cid} have different file types; use one"
        cases.append(case)
    cases += [Case(_split(f)[0], [f]) for f in plain]
    return cases


def find_cases(path: str | Path, *, exclude: Path | None = None) -> list[Case]:
    """The cases at ``path`` (a file or folder, see the module doc), sorted by id.

    ``exclude``: a subfolder not to take as a DICOM series (the output folder).
    Two inputs that give one case id are both marked with a problem.
    """
    path = Path(path)
    if not path.exists():
        raise MaskSAMError(f"{path}: not found; give an image file or a folder of images")
    if path.is_file():
        if path.name.lower().endswith(".dcm"):
            return [Case(path.parent.name, [path])]
        if not _split(path)[1]:
            raise MaskSAMError(f"{path}: not an image file; give a .nii.gz, .nii, .tif, .tiff or .dcm file")
        m = _CHANNEL.match(_split(path)[0])
        siblings = [path]
        if m:
            pattern = re.compile(re.escape(m["case"]) + r"_\d{4}" + re.escape(_split(path)[1]) + "$")
            siblings = sorted(f for f in path.parent.iterdir() if pattern.match(f.name))
        cases = [c for c in _group(siblings) if path in c.files]
        return cases
    entries = sorted(e for e in path.iterdir() if not e.name.startswith("."))
    files = [e for e in entries if e.is_file() and _split(e)[1]]
    skip = exclude.resolve() if exclude is not None else None
    folders = [e for e in entries if e.is_dir() and e.resolve() != skip and _looks_dicom(e)]
    if not files and not folders and _looks_dicom(path):
        return [Case(path.name, [path])]
    cases = _group(files) + [Case(d.name, [d]) for d in folders]
    by_id: dict[str, list[Case]] = {}
    for case in cases:
        by_id.setdefault(case.id, []).append(case)
    for cid, same in by_id.items():
        if len(same) > 1:
            names = ", ".join(str(c.source) for c in same)
            for case in same:
                case.problem = f"{case.source}: inputs {names} all give case {cid}; rename all but one"
    return sorted(cases, key=lambda c: (c.id, str(c.source)))


# --------------------------------------------------------------------------- several processes


def cases_for_rank(cases: list[Case], rank: int, world: int) -> list[Case]:
    """The cases rank ``rank`` of ``world`` predicts: case i goes to rank i % world."""
    return cases[rank::world]


# --------------------------------------------------------------------------- one case


def output_paths(case: Case, out_dir: Path, probabilities: bool) -> list[Path]:
    """The label map ``{case}.nii.gz`` (``.tif`` for TIFF input), its ``{case}.classes.json``, then
    ``{case}.npz`` if asked for."""
    from ..io import classes_sidecar

    paths = [out_dir / f"{case.id}{'.tif' if case.is_tiff else '.nii.gz'}"]
    paths.append(classes_sidecar(paths[0]))
    if probabilities:
        paths.append(out_dir / f"{case.id}.npz")
    return paths


def read_case_image(case: Case) -> tuple[np.ndarray, Any]:
    """The case's channels stacked to (C, Z, Y, X) and the first channel's geometry."""
    from ..io import compare_geometry, read_image

    arrays, geometry = [], None
    for f in case.files:
        array, g = read_image(f)
        if geometry is None:
            geometry = g
        elif (why := compare_geometry(g, geometry)) is not None:
            raise MaskSAMError(f"{f}: {why} against {case.files[0].name}; all channels of a case must share one "
                               "voxel grid (register or resample them onto channel 0 first)")
        arrays.append(array)
    return np.stack(arrays), geometry


def write_probabilities(path: Path, probabilities: np.ndarray, class_names: list[str],
                        spacing: tuple[float, ...]) -> None:
    """``{case}.npz``: probabilities float16 (C, Z, Y, X), class_names, spacing (sz, sy, sx); atomic."""
    try:
        with atomic_write(path) as handle:
            np.savez_compressed(handle, probabilities=probabilities.astype(np.float16),
                                class_names=np.array(class_names), spacing=np.array(spacing, np.float64))
    except OSError as error:
        raise MaskSAMError(f"{path}: cannot write ({error}); check the folder is writable and has space") from None


def predict_case(predictor: Predictor, case: Case, out_dir: Path, args: argparse.Namespace) -> list[Path]:
    """Read, predict and write one case; returns the files written."""
    from tqdm.auto import tqdm

    from ..io import write_labels

    if case.problem:
        raise MaskSAMError(case.problem)
    outputs = output_paths(case, out_dir, args.save_probabilities)
    inputs = {f.resolve() for f in case.files}
    if any(p.resolve() in inputs for p in outputs):
        raise MaskSAMError(f"{case.source}: the output would overwrite this input; choose another -o folder")
    image, geometry = read_case_image(case)
    gen = predictor.predict_iter(image, geometry.spacing, tta=args.tta, step_size=args.step_size,
                                 batch_size=args.batch_size, return_probabilities=args.save_probabilities)
    bar = None

    def show(progress: Any) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=progress.total, desc=case.id, unit="window", leave=False, dynamic_ncols=True,
                       file=sys.stderr)
        bar.update(progress.done - bar.n)

    try:
        prediction = drive(gen, show)
    finally:
        if bar is not None:
            bar.close()
    names = dict(enumerate(prediction.class_names))
    stale = out_dir / f"{case.id}.npz"
    if args.save_probabilities:
        assert prediction.probabilities is not None  # asked for with return_probabilities
        write_probabilities(outputs[2], prediction.probabilities, prediction.class_names, geometry.spacing)
    elif stale.exists():  # the probabilities of the prediction these labels replace: they would mislead
        stale.unlink()
        print(f"{case.id}: removed the old {stale.name}, the probabilities of the labels now replaced "
              "(--save-probabilities writes new ones)")
    write_labels(outputs[0], prediction.labels, geometry, class_names=names, overwrite=True)
    return outputs


def _one_line(case: Case, error: BaseException) -> str:
    """``file: reason`` on one line (the reason alone when it already names one of the case's files)."""
    reason = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, MaskSAMError):
        reason = f"unexpected {type(error).__name__}: {reason}"
    if any(str(f) in reason for f in case.files):
        return reason
    return f"{case.source}: {reason}"


# --------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    from .predictor import Predictor

    source, out_dir = Path(args.input), Path(args.output)
    if not 0 < args.step_size <= 1:
        raise MaskSAMError(f"--step-size {args.step_size}: give a fraction of the window in (0, 1] (0.5: half overlap)")
    if args.batch_size < 1:
        raise MaskSAMError(f"--batch-size {args.batch_size}: give 1 or more windows per step")
    if source.is_dir() and out_dir.resolve() == source.resolve():
        raise MaskSAMError(f"-o {out_dir} is the input folder; write the results to another folder")
    check_output_folder(out_dir, "-o")
    cases = find_cases(source, exclude=out_dir)
    if not cases:
        raise MaskSAMError(f"{source}: no images found; expected {{case}}_0000.nii.gz (nnU-Net naming), "
                           "{case}.nii.gz, .tif files or DICOM series folders")
    rank, world, local = distributed_env()
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    mine = cases_for_rank(cases, rank, world)
    todo = [c for c in mine if args.overwrite or c.problem
            or not all(p.exists() for p in output_paths(c, out_dir, args.save_probabilities))]
    skipped = len(mine) - len(todo)
    if skipped:
        print(f"{tag}skipped {skipped} existing (pass --overwrite to predict them again)")
    if not todo:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    device = args.device
    if world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local % torch.cuda.device_count()}"
    predictor = Predictor(args.model, device=device, base_checkpoint=args.base_checkpoint, amp=args.amp,
                          compile=args.compile)
    failed = done = 0
    for case in todo:
        start = time.perf_counter()
        try:
            written = predict_case(predictor, case, out_dir, args)
        except KeyboardInterrupt:
            raise
        except Exception as error:  # one bad case must not stop the others
            failed += 1
            print(f"{tag}failed: {_one_line(case, error)}", file=sys.stderr, flush=True)
            continue
        done += 1
        print(f"{tag}{case.id}: {written[0]} ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"{tag}predicted {done}, skipped {skipped} existing, failed {failed}")
    return 1 if failed else 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="segment scans with a trained run",
        description=(
            "Segment an image file or a folder of images with a trained run: the run's preprocessing, "
            "half-overlapping sliding windows with Gaussian weighting and 8 mirrored passes (--no-tta, or a run "
            "trained with --augmentation no-mirror: one), "
            "results resampled back to each input's grid. Writes OUT_DIR/{case}.nii.gz ({case}.tif for TIFF "
            "input) with the input's geometry and {case}.classes.json; cases already done are skipped. Folders: "
            "nnU-Net naming {case}_0000.nii.gz (channels {case}_0001, ...), plain {case}.nii.gz/.tif, or DICOM "
            "series subfolders. Several GPUs: torchrun --nproc_per_node=N -m masksam_core predict ..."
        ),
    )
    p.add_argument("-i", "--input", required=True, metavar="FILE_OR_DIR", help="an image file or a folder of images")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the results (created)")
    p.add_argument("-m", "--model", required=True, metavar="RUN", help="run folder or checkpoint file")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default: auto)")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="no mirroring (8x faster, slightly worse)")
    p.add_argument("--step-size", type=float, default=0.5,
                   help="window step as a fraction of the patch, in (0, 1] (default: 0.5 = half overlap)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per network call (default: 1)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write {case}.npz with per-class probabilities (float16)")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose outputs already exist again")
    p.add_argument("--base-checkpoint", metavar="PATH", help="local file with the run's base SAM weights")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help=AMP_HELP + " (default: auto)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network: a slow first window, then faster ones on GPUs "
                        "(on CPUs it does not pay)")
    p.set_defaults(func=run)
