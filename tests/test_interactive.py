"""Interactive annotation engine: slice cache, windows, propagation, clicks, named objects, CLI.

Mechanics run on a stand-in "SAM" whose answer is known (the bright object's part inside the box,
a little beyond it), so propagation and clicks must reproduce the object exactly; the cached path
is checked against BoxPrompter's zero-shot path with a small random backbone; the real LiteMedSAM
runs on the sample CT (slow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from masksam_core.errors import MaskSAMError
from masksam_core.inference import clicks as geo
from masksam_core.inference.box_prompt import BoxPrompter
from masksam_core.inference.clicks import Click
from masksam_core.inference.interactive import InteractiveSession, PropagationSettings
from masksam_core.inference.objects import LabelMap
from masksam_core.inference.slice_cache import Decoded, EmbeddingCache, SliceEncoder
from masksam_core.inference.windows import (
    SOFT_TISSUE,
    intensity_range,
    looks_like_ct,
    parse_window,
)
from masksam_core.modeling import build_backbone

ABDOMEN = "Dataset501_AbdomenCT"


def _blob_volume(z: int = 20, side: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A disc whose radius (3..12) and centre change along z, on slices 4..15."""
    yy, xx = np.mgrid[:side, :side]
    obj = np.zeros((z, side, side), bool)
    for k in range(4, 16):
        r = 3 + 9 * np.sin(np.pi * (k - 3.5) / 12)
        obj[k] = (yy - 20 - (k - 4) // 2) ** 2 + (xx - 24 + (k - 4) // 3) ** 2 <= r * r
    rng = np.random.default_rng(0)
    return (obj + 0.05 * rng.random(obj.shape)).astype(np.float32), obj


class FakeEncoder(SliceEncoder):
    """SliceEncoder whose "SAM" returns the bright voxels inside the prompt box grown by 4."""

    def decode(self, z, box=None, points=(), mask=None):
        bright = self.volume[z] > 0.5
        if box is None:
            return Decoded(torch.full(bright.shape, -1.0), torch.zeros(1), 0.0)
        y0, x0, y1, x1 = box
        region = np.zeros_like(bright)
        region[max(y0 - 4, 0):y1 + 4, max(x0 - 4, 0):x1 + 4] = True
        m = bright & region
        return Decoded(torch.from_numpy(np.where(m, 5.0, -5.0)), self.mask_prompt(m), 0.9)


def _fake_session(volume, **settings) -> InteractiveSession:
    return InteractiveSession(FakeEncoder(volume, build_backbone("tiny"), device="cpu", window="percentile"),
                              PropagationSettings(**settings))


# --------------------------------------------------------------------------- windows and cache


def test_windows():
    ct = np.full((4, 8, 8), -1000.0)
    ct[:, 2:6, 2:6] = 40
    assert looks_like_ct(ct) and intensity_range(ct) == SOFT_TISSUE
    mr = np.random.default_rng(0).random((4, 8, 8)) * 500
    assert not looks_like_ct(mr) and intensity_range(mr) == tuple(np.percentile(mr, (0.5, 99.5)))
    assert intensity_range(ct, "percentile") != SOFT_TISSUE
    assert parse_window("ct") == parse_window("soft-tissue") == SOFT_TISSUE
    assert parse_window("-100,300") == (-100.0, 300.0)
    for bad in ("lung", "5,1", "a,b"):
        with pytest.raises(MaskSAMError, match="window"):
            parse_window(bad)


def test_cache_is_lru_by_bytes():
    cache = EmbeddingCache(max_bytes=3 * 4 * 16 * 2, dtype=torch.bfloat16)  # three (4, 4, 4) bf16 slices
    for z in range(3):
        cache.put(z, torch.ones(4, 4, 4))
    assert cache.get(0) is not None and cache.get(0).dtype == torch.bfloat16
    cache.put(3, torch.ones(4, 4, 4))  # evicts 1, the least recently used
    assert 1 not in cache and all(z in cache for z in (0, 2, 3)) and cache.nbytes == 3 * 128


def test_cached_decode_equals_box_prompter():
    """The oracle: same slice, same box -> the same logits as BoxPrompter's zero-shot path (fp32 cache)."""
    torch.manual_seed(0)
    sam = build_backbone("tiny").eval()
    volume = np.random.default_rng(1).normal(size=(4, 40, 56)).astype(np.float32)
    enc = SliceEncoder(volume, sam, device="cpu", amp="off", window="percentile", cache_dtype=torch.float32)
    prompter = BoxPrompter(sam, device="cpu", amp="off", window="percentile")
    z, box = 2, (5, 7, 30, 40)
    frame = enc.frame
    low, high = intensity_range(volume, "percentile")
    image = frame.image(torch.from_numpy(np.clip(volume[z], low, high)), sam.pixel_mean, sam.pixel_std)
    expected = frame.logits(prompter.predict_slices(image[None], torch.tensor([[frame.box(*box)]]))[0])[0]
    out = enc.decode(z, box)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-5)
    labels = prompter.segment(volume, [(z, z + 1, *box)])
    assert np.array_equal(labels[z] > 0, out.mask)
    assert len(enc.cache) == 1
    enc.decode(z, box, points=[(10, 12, True)])  # a second prompt on the slice does not encode again
    assert len(enc.cache) == 1
    gen = enc.encode_iter()
    first = next(gen)
    gen.close()
    assert (first.done, first.total) == (1, 3) and len(enc.cache) == 2


# --------------------------------------------------------------------------- propagation


def test_propagation_follows_object_that_changes_size():
    volume, obj = _blob_volume()
    session = _fake_session(volume)
    from masksam_core.inference.clicks import mask_box

    ann = session.start({10: mask_box(obj[10])})
    assert np.array_equal(ann.mask(), obj)
    # limits bound it; several key slices steer it
    ann = session.start({10: mask_box(obj[10])}, limits=(8, 13))
    assert np.array_equal(ann.mask()[8:13], obj[8:13]) and not ann.mask()[:8].any() and not ann.mask()[13:].any()
    ann = session.start({5: mask_box(obj[5]), 14: mask_box(obj[14])})
    assert np.array_equal(ann.mask(), obj)


def test_propagation_is_a_progress_generator():
    volume, obj = _blob_volume()
    gen = _fake_session(volume).start_iter({10: geo.mask_box(obj[10])})
    events = [next(gen) for _ in range(3)]
    assert [e.done for e in events] == [1, 2, 3] and events[0].total == 19
    gen.close()


def test_propagation_errors():
    volume, _ = _blob_volume()
    session = _fake_session(volume)
    with pytest.raises(MaskSAMError, match="at least one slice"):
        session.start({})
    with pytest.raises(MaskSAMError, match="outside the volume"):
        session.start({25: (1, 1, 5, 5)})
    with pytest.raises(MaskSAMError, match="keep 0 <= Y0"):
        session.start({3: (5, 1, 5, 5)})
    with pytest.raises(MaskSAMError, match="z limits"):
        session.start({3: (1, 1, 5, 5)}, limits=(5, 4))


# --------------------------------------------------------------------------- clicks


def test_click_geometry():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    assert geo.mask_box(m) == (2, 3, 5, 9) and geo.mask_box(m, 3) == (0, 0, 8, 12)
    assert geo.mask_box(np.zeros((3, 3), bool)) is None
    assert geo.grow_box((2, 3, 5, 9), 8, 1, 1, (10, 12)) == (2, 0, 10, 9)
    assert geo.shrink_box((2, 3, 5, 9), 4, 5) == (2, 3, 4, 9)   # nearest side: the bottom
    assert geo.shrink_box((2, 3, 5, 9), 3, 8) == (2, 3, 5, 8)   # the right
    assert geo.shrink_box((2, 3, 5, 9), 0, 0) is None            # outside the box
    assert geo.shrink_box((2, 3, 3, 4), 2, 3) is None            # one voxel: cannot shrink
    assert geo.local_box(5, 5, (0, 0, 20, 40), (30, 30)) == (0, 0, 13, 13)  # side 14
    two = m.copy()
    two[7:9, 0:2] = True
    assert geo.component_at(two, 8, 1).sum() == 4 and not geo.component_at(two, 0, 0).any()


def test_positive_click_outside_box_grows_it_and_repropagates():
    volume, obj = _blob_volume()
    session = _fake_session(volume, click_rule="box")
    y0, x0, y1, x1 = geo.mask_box(obj[10])
    ann = session.start({10: (y0, x0, y1, (x0 + x1) // 2 - 3)})  # misses the right part of the disc
    assert ann.mask().sum() < obj.sum()
    ys, xs = np.nonzero(obj[10] & ~ann.slice_mask(10))
    ann = session.click(ann, Click(10, int(ys[len(ys) // 2]), int(xs.max()), True))
    assert np.array_equal(ann.mask(), obj)


def test_negative_click_clears_an_end_slice_and_stops_there():
    volume, obj = _blob_volume()
    volume[16:18, 18:24, 20:26] = 1.0  # something bright touching the object's end: the walk leaks into it
    session = _fake_session(volume, click_rule="box+local")
    ann = session.start({10: geo.mask_box(obj[10])})
    assert ann.slice_mask(16).any() and ann.slice_mask(17).any()
    ann = session.click(ann, Click(16, 20, 22, False))
    assert not ann.mask()[16:].any() and np.array_equal(ann.mask(), obj)


def test_local_rules_add_and_remove_inside_the_box():
    volume, obj = _blob_volume()
    session = _fake_session(volume, click_rule="box+local")
    ann = session.start({10: geo.mask_box(obj[10])})
    # negative click on a part of the mask the box cannot drop: removed locally, the rest stays
    ann = session.click(ann, Click(10, 20, 24, False))
    assert not ann.slice_mask(10)[20, 24] and ann.slice_mask(10).sum() > 0.7 * obj[10].sum()
    # positive click there again: added back
    ann = session.click(ann, Click(10, 20, 24, True))
    assert ann.slice_mask(10)[20, 24]
    assert len(ann.clicks) == 2 and 10 in ann.keys


def test_positive_click_beyond_the_end_extends_the_object():
    volume, obj = _blob_volume()
    session = _fake_session(volume, click_rule="box+local")
    ann = session.start({10: geo.mask_box(obj[10])}, limits=(6, 20))
    assert not ann.mask()[:6].any()
    ann.limits = (0, 20)
    ys, xs = np.nonzero(obj[5])
    ann = session.click(ann, Click(5, int(ys.mean()), int(xs.mean()), True))
    assert np.array_equal(ann.mask(), obj)


def test_native_points_for_vit_and_correction_of_a_label():
    volume, obj = _blob_volume()
    session = _fake_session(volume)
    assert session.rule == "native"  # the tiny backbone is a ViT
    label = obj.copy()
    label[12:] = False  # an existing label that stops too early
    ann = session.from_mask(label, limits=(8, 20))
    ann = session.click(ann, Click(11, *map(int, np.argwhere(obj[11])[0]), True))
    assert np.array_equal(ann.mask(), obj)
    with pytest.raises(MaskSAMError, match="outside the slice"):
        session.click(ann, Click(11, 60, 2, True))
    with pytest.raises(MaskSAMError, match="z limits"):
        session.click(ann, Click(2, 2, 2, True))
    with pytest.raises(MaskSAMError, match="click rule"):
        InteractiveSession(session.encoder, PropagationSettings(click_rule="magic"))


def test_real_tiny_backbone_runs_through_the_session():
    volume, _ = _blob_volume(20, 32)
    enc = SliceEncoder(volume, build_backbone("tiny"), device="cpu")
    session = InteractiveSession(enc, PropagationSettings(mask_prompt=True, min_area=0))
    ann = session.start({8: (10, 10, 25, 25)}, limits=(6, 11))
    ann = session.click(ann, Click(8, 12, 12, True))
    assert ann.mask().shape == volume.shape and not ann.mask()[:6].any()
    assert len(enc.cache) <= 5


# --------------------------------------------------------------------------- named objects


def test_label_map_names_no_overwrite_and_undo():
    existing = np.zeros((2, 4, 4), np.uint16)
    existing[0, :2] = 5
    lm = LabelMap(labels=existing.copy(), names={5: "liver"})
    a = np.zeros((2, 4, 4), bool)
    a[0, 1:3] = True
    assert lm.add(a, "spleen") == 1
    assert (lm.labels[0, 1] == 5).all() and (lm.labels[0, 2] == 1).all()  # liver kept
    assert lm.add(a, "kidney", overwrite=True) == 2 and (lm.labels[0, 1:3] == 2).all()
    assert lm.class_names() == {0: "background", 1: "spleen", 2: "kidney", 5: "liver"}
    assert lm.undo() == 2 and (lm.labels[0, 1] == 5).all() and (lm.labels[0, 2] == 1).all() and 2 not in lm.names
    b = np.zeros_like(a)
    b[1, 3, 3] = True
    lm.update(1, b)  # a corrected object replaces its own voxels only
    assert (lm.labels == 1).sum() == 1 and lm.labels[1, 3, 3] == 1
    lm.undo()
    lm.undo()
    assert np.array_equal(lm.labels, existing) and lm.names == {5: "liver"} and not lm.can_undo
    assert lm.undo() is None and lm.add(a) == 1 and lm.names[1] == "object_1"
    with pytest.raises(MaskSAMError, match="no object"):
        lm.update(7, a)
    with pytest.raises(MaskSAMError, match="shape"):
        lm.add(np.ones((3, 3, 3), bool))


# --------------------------------------------------------------------------- command line


def test_cli_propagate_points_names_and_errors(tmp_path, capsys, monkeypatch):
    import json

    import nibabel as nib

    from masksam_core.cli import main
    from masksam_core.modeling import backbone

    monkeypatch.setattr(backbone, "load_sam_backbone", lambda name, checkpoint=None, **kw: build_backbone("tiny"))
    monkeypatch.setattr(SliceEncoder, "decode", FakeEncoder.decode)
    volume, obj = _blob_volume()
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4)), tmp_path / "scan.nii.gz")
    out = tmp_path / "seg.nii.gz"
    base = ["prompt", "-i", str(tmp_path / "scan.nii.gz"), "-o", str(out), "--device", "cpu"]
    y0, x0, y1, x1 = geo.mask_box(obj[10])
    box = ["--box", "10", "11", str(y0), str(x0), str(y1), str(x1)]
    assert main([*base, *box, "--propagate", "--name", "blob"]) == 0
    seg = np.asarray(nib.load(out).dataobj).transpose(2, 1, 0)
    assert np.array_equal(seg == 1, obj) and set(np.unique(seg)) == {0, 1}
    assert json.loads((tmp_path / "seg.classes.json").read_text()) == {"0": "background", "1": "blob"}
    assert "blob:" in capsys.readouterr().out
    # a box over slices 8..11 follows the object there only (a click on it changes nothing here); a second,
    # overlapping object keeps out of the first one's voxels
    ys, xs = np.nonzero(obj[9])
    assert main([*base, "--box", "8", "12", str(y0), str(x0), str(y1), str(x1), "--point", "9", str(ys[0]),
                 str(xs[0]), "+", *box, "--overwrite", "--propagate"]) == 0
    seg = np.asarray(nib.load(out).dataobj).transpose(2, 1, 0)
    assert np.array_equal(seg == 1, obj & (np.arange(20) >= 8)[:, None, None] & (np.arange(20) < 12)[:, None, None])
    assert np.array_equal(seg > 0, obj)
    assert json.loads((tmp_path / "seg.classes.json").read_text())["2"] == "box_2"
    capsys.readouterr()
    for extra, message in [
        (["--point", "10", "5", "5", "+"], "--point refines a propagated object: add --propagate"),
        (["--propagate", "--point", "10", "5", "5", "x"], "must be + (belongs to the object) or -"),
        (["--propagate", "--point", "10", "5", "99", "+"], "outside the image of shape (Z, Y, X) = (20, 48, 48)"),
        (["--propagate", "--point", "1.5", "5", "5", "+"], "whole voxel indices"),
        (["--propagate", "--name", "a", "--name", "b"], "2 --name for 1 --box"),
        (["--propagate", "--window", "lung"], "unknown window 'lung'"),
    ]:
        assert main([*base, *box, "--overwrite", *extra]) == 1, extra
        assert message in capsys.readouterr().err, extra
    assert main([*base, "--point", "10", "5", "5", "+", *box, "--overwrite", "--propagate"]) == 1
    assert "give it after the --box" in capsys.readouterr().err


# --------------------------------------------------------------------------- LiteMedSAM on the sample CT


@pytest.mark.slow
def test_lite_propagation_and_click_on_sample_ct(shared_data):
    from masksam_core.io import read_image
    from masksam_core.modeling.backbone import load_sam_backbone

    root = shared_data / ABDOMEN
    volume = read_image(root / "imagesTr" / "abdct_001_0000.nii.gz")[0]
    labels = read_image(root / "labelsTr" / "abdct_001.nii.gz")[0]
    enc = SliceEncoder(volume, load_sam_backbone("lite"), device="cpu")
    assert enc.window == SOFT_TISSUE
    truth = labels == 3  # left kidney
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    mid = int(zs[len(zs) // 2])
    session = InteractiveSession(enc)
    ann = session.start({mid: geo.mask_box(truth[mid])}, limits=(mid - 3, mid + 4))
    pred = ann.mask()[mid - 3:mid + 4]
    ref = truth[mid - 3:mid + 4]
    assert 2 * (pred & ref).sum() / (pred.sum() + ref.sum()) > 0.8
    ys, xs = np.nonzero(truth[mid])
    ann = session.click(ann, Click(mid, int(ys.mean()), int(xs.mean()), True))
    assert ann.slice_mask(mid)[int(ys.mean()), int(xs.mean())]
    assert len(enc.cache) == 7


def test_box_prompter_sees_the_soft_tissue_window_on_ct():
    """prompt's plain --box path: a CT volume is clipped to -160..240 HU by default, not to its percentiles."""
    seen = []

    def capture(images, boxes):
        seen.append(images[0, 0].clone())
        return torch.full((*boxes.shape[:2], 32, 32), -1.0)

    volume = np.full((1, 32, 32), -1000.0, np.float32)
    volume[0, 8:24, 8:24] = 40.0   # soft tissue
    volume[0, 12:16, 12:16] = 1500.0  # bone: saturates in the window
    volume[0, 18:22, 18:22] = 0.0     # water: below tissue in the window
    for window, contrast in (("auto", 40 / 400), ("percentile", 40 / 2500)):  # tissue - water, of the range
        prompter = BoxPrompter(build_backbone("tiny"), device="cpu", window=window)
        prompter.predict_slices = capture
        prompter.segment(volume, [(0, 1, 0, 0, 32, 32)])
        image = seen[-1]  # 64 x 64: voxel (y, x) -> pixels (2y, 2x), (2y+1, 2x+1)
        tissue_minus_water = float(image[2 * 10, 2 * 10] - image[2 * 20, 2 * 20]) / float(image.max() - image.min())
        assert tissue_minus_water == pytest.approx(contrast, rel=0.05), window
    with pytest.raises(MaskSAMError, match="unknown window"):
        BoxPrompter(build_backbone("tiny"), device="cpu", window="bone")
