"""Box prompts: one 3D mask per user box, zero-shot with a base SAM or with a ``gt``-mode run.

Boxes are voxel indices of the volume as read (axes (Z, Y, X)), **half-open** like numpy slices:
``(z0, z1, y0, x0, y1, x1)`` covers ``volume[z0:z1, y0:y1, x0:x1]`` (the CLI's
``--box Z0 Z1 Y0 X0 Y1 X1``). Box i becomes label i + 1; where masks of several boxes overlap,
the later box wins. Each box's mask is confined to its slices z0..z1-1 but not in-plane:
SAM's mask may reach past the box edge, as SAM's own tools allow.

**Zero-shot** (``lite``, ``vit_b``, ``vit_l``, ``vit_h``, or a :class:`SamBackbone` object): the frozen
SAM runs slice by slice, each slice encoded once for all boxes that cover it; the box is the same
rectangle on every slice of its z-range. Slice preparation, as LiteMedSAM's and SAM's own inference
do it: the volume is clipped to its intensity window (:mod:`.windows`: -160..240 HU for CT, as
MedSAM's preprocessing, else its [0.5, 99.5] percentiles); each slice is resized so
that its longer side is S (the backbone's input side: 256 for lite, 1024 for ViT) with
antialiased bilinear interpolation, min-max scaled to [0, 255], normalised with the backbone's
``pixel_mean``/``pixel_std`` (SAM: ImageNet statistics; lite: /255), padded with zeros at the
bottom/right to S x S and repeated to 3 channels. A box's edges map by the same scale,
(x0, y0, x1, y1) -> (x0 s, y0 s, x1 s - 1, y1 s - 1) in SAM's pixel-index convention (first and
last pixel inside). SAM's low-resolution logits are resized to S x S, the padding is cropped,
the rest resized to the slice's (Y, X) and thresholded at 0.

**gt-mode run** (a run folder or checkpoint trained with ``--prompt-mode gt``): the run's own
preprocessing (``plans``) is applied, each box becomes one query whose mask prompt is the filled
box rectangle on each of its slices (the model takes its box prompt from that mask, so box and
mask agree), and the 3D model runs over half-overlapping windows of its patch size (T, H, W). In
windows and slices a box does not reach, its logits are set to -20 (no object). Logits are
resampled back to the input grid and thresholded at 0. The model was trained with exact object
masks as mask prompts; a filled rectangle is a coarser prompt than it saw in training.
"""

from __future__ import annotations

import argparse
import operator
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..data.plans import Plans
from ..devices import AMP_CHOICES, AMP_HELP, DEVICE_CHOICES, autocast_dtype, select_device
from ..errors import MaskSAMError
from ..modeling.backbone import SamBackbone
from ..progress import drive
from . import interactive_cli
from .sliding_window import Progress, sliding_window
from .windows import Window, intensity_range, parse_window

if TYPE_CHECKING:
    from ..modeling.masksam import MaskSAM

__all__ = ["BASE_MODELS", "BoxPrompter", "SliceFrame", "add_cli", "check_boxes"]

BASE_MODELS = ("lite", "vit_b", "vit_l", "vit_h")
ABSENT_LOGIT = -20.0


@dataclass(frozen=True)
class SliceFrame:
    """How a (height, width) slice sits in SAM's size x size input: resized so the longer side
    is ``size`` (SAM's ``ResizeLongestSide`` rounding), then padded at the bottom and right."""

    height: int
    width: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.height, self.width)

    @property
    def resized(self) -> tuple[int, int]:
        """(new_height, new_width) inside the size x size input."""
        return int(self.height * self.scale + 0.5), int(self.width * self.scale + 0.5)

    def box(self, y0: int, x0: int, y1: int, x1: int) -> tuple[float, float, float, float]:
        """Half-open voxel box -> SAM box (x0, y0, x1, y1), pixel indices of the first and last
        input pixel inside it."""
        nh, nw = self.resized
        sy, sx = nh / self.height, nw / self.width
        return (x0 * sx, y0 * sy, max(x1 * sx - 1, x0 * sx), max(y1 * sy - 1, y0 * sy))

    def image(self, slice_yx: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """Clipped slice (Y, X) float -> SAM input (3, S, S): resize, min-max to [0, 255], normalise, pad."""
        x = F.interpolate(slice_yx[None, None].float(), size=self.resized, mode="bilinear", align_corners=False,
                          antialias=True)[0, 0]
        low, high = x.min(), x.max()
        x = (x - low) / torch.clamp(high - low, min=1e-8) * 255.0
        m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
        s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
        x = (x[None] - m) / s
        return F.pad(x, (0, self.size - x.shape[-1], 0, self.size - x.shape[-2]))

    def logits(self, low: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits (K, L, L) -> logits (K, height, width) on the slice."""
        nh, nw = self.resized
        up = F.interpolate(low[None].float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        up = up[..., :nh, :nw]
        return F.interpolate(up, size=(self.height, self.width), mode="bilinear", align_corners=False)[0]


def check_boxes(boxes: Sequence[Sequence[int]], shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Validate half-open boxes (z0, z1, y0, x0, y1, x1) against a (Z, Y, X) ``shape``."""
    if len(boxes) == 0:
        raise MaskSAMError("no box given; give at least one box Z0 Z1 Y0 X0 Y1 X1")
    out: list[tuple[int, ...]] = []
    z, y, x = (int(v) for v in shape[-3:])
    for i, box in enumerate(boxes, 1):
        try:
            b = tuple(operator.index(v) for v in box)
        except TypeError:
            raise MaskSAMError(f"box {i} {list(box)}: coordinates must be whole voxel indices") from None
        if len(b) != 6:
            raise MaskSAMError(f"box {i} {list(b)}: give 6 numbers Z0 Z1 Y0 X0 Y1 X1, not {len(b)}")
        z0, z1, y0, x0, y1, x1 = b
        for lo, hi, name in ((z0, z1, "Z"), (y0, y1, "Y"), (x0, x1, "X")):
            if lo >= hi:
                raise MaskSAMError(f"box {i} {list(b)}: {name}0={lo} must be below {name}1={hi} "
                                   f"(the box covers {name}0 .. {name}1-1)")
        if min(b) < 0 or z1 > z or y1 > y or x1 > x:
            raise MaskSAMError(f"box {i} {list(b)} reaches outside the image of shape (Z, Y, X) = ({z}, {y}, {x}); "
                               f"keep 0 <= Z0 < Z1 <= {z}, 0 <= Y0 < Y1 <= {y}, 0 <= X0 < X1 <= {x}")
        out.append(b)
    return out


def _is_run(model: str | os.PathLike) -> bool:
    path = Path(model)
    return path.is_dir() or path.suffix == ".pt"


class BoxPrompter:
    """Segment one object per box in a 3D volume (see the module docstring for the conventions).

    Args:
        model: ``lite`` (default), ``vit_b``, ``vit_l``, ``vit_h`` (zero-shot), a :class:`SamBackbone`
            (zero-shot; e.g. a small random one in tests), or a ``gt``-mode run folder / checkpoint.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        checkpoint: zero-shot: a local file with the base weights (skips the download); run: the
            base weights the run was trained on (``--base-checkpoint`` at training).
        amp: autocast dtype, as :class:`Predictor`'s: ``auto`` (bf16 on CUDA and on CPUs with native
            bf16, fp32 elsewhere), ``bf16``, ``fp16`` or ``off``.
        window: zero-shot: the intensity window SAM sees (:mod:`.windows`): ``auto`` (the soft-tissue
            window -160..240 HU for a volume that looks like HU CT, else the volume's percentiles),
            ``ct``, ``percentile`` or (low, high).
    """

    def __init__(self, model: str | os.PathLike | SamBackbone = "lite", *, device: str = "auto",
                 checkpoint: str | os.PathLike | None = None, progress: bool = True, amp: str = "auto",
                 window: Window = "auto") -> None:
        self.window = parse_window(window)
        self.device = select_device(device)
        self.amp = autocast_dtype(self.device, amp, cpu_bf16=True)
        self.sam: SamBackbone | None = None
        self.run_model: MaskSAM | None = None
        self.plans: Plans | None = None
        if isinstance(model, SamBackbone):
            self.sam, self.name = model, model.name
        elif str(model) in BASE_MODELS:
            from ..modeling.backbone import load_sam_backbone

            self.name = str(model)
            self.sam = load_sam_backbone(self.name, checkpoint, progress=progress)
        elif _is_run(model) and Path(model).exists():
            self._load_run(Path(model), checkpoint)
        else:
            raise MaskSAMError(f"unknown model {str(model)!r}: use one of {', '.join(BASE_MODELS)} or a run folder "
                               "(or checkpoint .pt) trained with `masksam-core train --prompt-mode gt`")
        if self.sam is not None:
            self.sam = self.sam.to(self.device).eval()

    def _load_run(self, path: Path, checkpoint: str | os.PathLike | None) -> None:
        from ..runs import load_run

        model, run = load_run(path, base_checkpoint=checkpoint, device=self.device)
        if getattr(model, "prompt_mode", None) != "gt":
            raise MaskSAMError(f"{path} was trained with --prompt-mode {model.prompt_mode}: its prompts come from its "
                               "own prompt generator, not from boxes. Use a run trained with --prompt-mode gt, or a "
                               f"base model ({', '.join(BASE_MODELS)}) for zero-shot box prompts")
        self.run_model, self.plans, self.name = model, Plans.from_dict(run.plans), str(path)

    @property
    def mode(self) -> str:
        """``"zero-shot"`` or ``"gt-run"``."""
        return "zero-shot" if self.sam is not None else "gt-run"

    def predict_slices(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Zero-shot engine: images (N, 3, S, S), boxes (N, K, 4) -> low-res logits (N, K, L, L)."""
        assert self.sam is not None
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return self.sam.zero_shot(images, boxes).float()

    def segment(self, volume: np.ndarray, boxes: Sequence[Sequence[int]], *,
                spacing: Sequence[float] | None = None) -> np.ndarray:
        """Labels (Z, Y, X) uint16 for ``volume`` (Z, Y, X) (a run with C channels: (C, Z, Y, X)):
        box i -> label i + 1. ``spacing`` (sz, sy, sx) mm is needed for a run (its resampling)."""
        return drive(self.segment_iter(volume, boxes, spacing=spacing))

    def segment_iter(self, volume: np.ndarray, boxes: Sequence[Sequence[int]], *,
                     spacing: Sequence[float] | None = None) -> Generator[Progress, None, np.ndarray]:
        """:meth:`segment` as a generator: yields :class:`Progress` (slices, or windows for a run, done of
        total) and returns the labels; closing it stops the work before the next slice or window."""
        volume = np.asarray(volume)
        checked = check_boxes(boxes, volume.shape)
        if self.sam is not None:
            if volume.ndim != 3:
                raise MaskSAMError(f"zero-shot box prompts take one (Z, Y, X) volume, got shape {volume.shape}")
            masks = yield from self._zero_shot(volume, checked)
        else:
            masks = yield from self._run(volume, checked, spacing)
        labels = np.zeros(volume.shape[-3:], dtype=np.uint16)
        for i, (mask, (z0, z1, *_)) in enumerate(zip(masks, checked, strict=True), 1):
            labels[z0:z1][mask] = i  # mask: (z1 - z0, Y, X); later boxes win overlaps
        return labels

    def _zero_shot(self, volume: np.ndarray, boxes: list[tuple[int, ...]]
                   ) -> Generator[Progress, None, list[np.ndarray]]:
        assert self.sam is not None
        sam, start = self.sam, time.perf_counter()
        low, high = intensity_range(volume, self.window)
        frame = SliceFrame(volume.shape[1], volume.shape[2], sam.image_size)
        masks = [np.zeros((b[1] - b[0], *volume.shape[1:]), dtype=bool) for b in boxes]  # each box's slices
        slices = sorted({z for b in boxes for z in range(b[0], b[1])})
        for done, z in enumerate(slices, 1):
            which = [i for i, b in enumerate(boxes) if b[0] <= z < b[1]]
            image = torch.from_numpy(np.clip(volume[z].astype(np.float32), low, high)).to(self.device)
            image = frame.image(image, sam.pixel_mean, sam.pixel_std)
            prompts = torch.tensor([frame.box(*boxes[i][2:]) for i in which], dtype=torch.float32, device=self.device)
            logits = frame.logits(self.predict_slices(image[None], prompts[None])[0])
            for i, m in zip(which, (logits > 0).cpu().numpy(), strict=True):
                masks[i][z - boxes[i][0]] = m
            yield Progress(done, len(slices), time.perf_counter() - start)
        return masks

    def _run(self, volume: np.ndarray, boxes: list[tuple[int, ...]], spacing: Sequence[float] | None
             ) -> Generator[Progress, None, list[np.ndarray]]:
        from ..data.preprocess import preprocess_image, resample_to_shape

        model, plans = self.run_model, self.plans
        assert model is not None and plans is not None
        channels = plans.in_channels
        image = volume[None] if volume.ndim == 3 and channels == 1 else volume
        if image.ndim != 4 or image.shape[0] != channels:
            raise MaskSAMError(f"this run takes {channels} channel(s) {list(plans.channel_names.values())}: give "
                               f"a (C, Z, Y, X) volume with C = {channels}, got shape {volume.shape}")
        if spacing is None or len(spacing) != 3 or min(spacing) <= 0:
            raise MaskSAMError(f"a run resamples to its spacing {list(plans.target_spacing)}: pass the volume's "
                               f"spacing (sz, sy, sx) in mm, got {spacing}")
        shape, target = image.shape[1:], plans.target_spacing
        prepared = preprocess_image(image.astype(np.float32), spacing, plans)
        rects = np.zeros((len(boxes), *shape), dtype=np.float32)
        for rect, (z0, z1, y0, x0, y1, x1) in zip(rects, boxes, strict=True):
            rect[z0:z1, y0:y1, x0:x1] = 1.0
        rects = resample_to_shape(rects, prepared.shape[1:], current_spacing=spacing, new_spacing=target)
        rects = np.stack([r > 0.5 if (r > 0.5).any() else r > 0 for r in rects]).astype(np.float32)
        stacked = torch.from_numpy(np.concatenate([prepared, rects]))

        def predictor(window: torch.Tensor) -> torch.Tensor:  # (B, C + Q, T, H, W) -> (B, Q, T, H, W)
            prompt = window[:, channels:] > 0.5
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                                 enabled=self.amp is not None):
                out = model(window[:, :channels], {"masks": prompt})["pred_masks"].float()
            present = prompt.flatten(-2).any(-1)[..., None, None]
            return torch.where(present, out, torch.full_like(out, ABSENT_LOGIT))

        logits = yield from sliding_window(stacked, predictor, model.patch_size, overlap=0.5, device=self.device,
                                           accumulate_on="cpu")
        back = resample_to_shape(logits.numpy(), shape, current_spacing=target, new_spacing=spacing)
        return [b[z0:z1] > 0 for b, (z0, z1, *_) in zip(back, boxes, strict=True)]


# --------------------------------------------------------------------------- command line


def _cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..errors import check_output_folder
    from ..files import NIFTI_SUFFIXES, TIFF_SUFFIXES
    from ..io import check_classes_sidecar, classes_sidecar, read_image, spacing_sidecar, write_labels

    out = Path(args.output)
    if not out.name.lower().endswith(NIFTI_SUFFIXES + TIFF_SUFFIXES):
        raise MaskSAMError(f"{out}: name the output .nii.gz, .nii, .tif or .tiff")
    tiff = out.name.lower().endswith(TIFF_SUFFIXES)
    for target in (out, classes_sidecar(out), *([spacing_sidecar(out)] if tiff else [])):  # before segmenting
        if target.exists() and not args.overwrite:
            raise MaskSAMError(f"{target} already exists; pass --overwrite to replace it, or choose another output "
                               "name")
    check_output_folder(out.parent, "-o (its folder)")
    if len(args.name) > len(args.box):
        raise MaskSAMError(f"{len(args.name)} --name for {len(args.box)} --box: give at most one name per box")
    names = {0: "background", **{i: (args.name[i - 1] if i <= len(args.name) else f"box_{i}")
                                 for i in range(1, len(args.box) + 1)}}
    check_classes_sidecar(out, {str(k): v for k, v in names.items()})
    model = args.model
    if model not in BASE_MODELS and not (_is_run(model) and Path(model).exists()):
        raise MaskSAMError(f"unknown model {model!r}: use one of {', '.join(BASE_MODELS)} or an existing run folder "
                           "trained with --prompt-mode gt")
    if args.point and not args.propagate:
        raise MaskSAMError("--point refines a propagated object: add --propagate")
    if args.propagate and model not in BASE_MODELS:
        raise MaskSAMError(f"--propagate runs a base model zero-shot ({', '.join(BASE_MODELS)}), not a run")
    parse_window(args.window)
    volume, geometry = read_image(args.input)
    boxes = check_boxes(args.box, volume.shape)
    points = interactive_cli.check_points(args.point, len(boxes), volume.shape)
    prompter = BoxPrompter(model, device=args.device, checkpoint=args.checkpoint, amp=args.amp, window=args.window)
    unit = "slice" if prompter.mode == "zero-shot" else "window"
    with tqdm(desc=f"{Path(args.input).name} ({len(boxes)} box{'es' if len(boxes) > 1 else ''})", unit=unit,
              dynamic_ncols=True) as bar:
        def show(progress: Progress) -> None:
            bar.total = progress.total
            bar.update(progress.done - bar.n)

        if args.propagate:  # slices decoded, their number open in advance
            labels, names = interactive_cli.segment_propagated(
                volume, boxes, points, args.name, sam=prompter.sam, device=args.device, amp=args.amp,
                window=args.window, progress=lambda p: bar.update(1 if p.done else 0))
        else:
            labels = drive(prompter.segment_iter(volume, boxes, spacing=geometry.spacing), show)
    write_labels(out, labels, geometry, class_names=names, overwrite=args.overwrite)
    found = ", ".join(f"{names[i]}: {int((labels == i).sum())} voxels" for i in range(1, len(boxes) + 1))
    print(f"wrote {out} ({found})")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prompt", help="segment objects from boxes (zero-shot SAM or a gt-mode run)",
        description=("Segment one object per --box in a 3D image and write a label map (box i -> label i) with the "
                     "image's geometry. Boxes are half-open voxel ranges of the image as read (axes Z, Y, X): "
                     "--box 10 14 50 60 90 120 covers slices 10..13, rows 50..89, columns 60..119. Later boxes win "
                     "where masks overlap. With --propagate a box on one slice (--box Z Z+1 Y0 X0 Y1 X1) is followed "
                     "through the slices, --point clicks refine it, and earlier objects keep their voxels. DICOM "
                     "inputs are written as NIfTI/TIFF (no DICOM-SEG)."))
    p.add_argument("-i", "--input", required=True, metavar="IMAGE", help="NIfTI, 3D TIFF or DICOM series folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="label file to write (.nii.gz, .nii, .tif)")
    p.add_argument("--box", required=True, action="append", nargs=6, type=int,
                   metavar=("Z0", "Z1", "Y0", "X0", "Y1", "X1"), help="one box (repeat for more)")
    p.add_argument("--model", default="lite", help=f"{' | '.join(BASE_MODELS)} (zero-shot) or RUN_DIR of a gt-mode "
                   "run (default: lite)")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default: auto)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help=AMP_HELP + " (default: auto)")
    p.add_argument("--checkpoint", metavar="PATH", help="local base weights file (skips the download)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    interactive_cli.add_arguments(p)
    p.set_defaults(func=_cli)

