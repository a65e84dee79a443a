"""Sliding-window inference: the 2*x invariant, mirroring, progress and validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from masksam_core.data.loader import PatchSampler
from masksam_core.inference.sliding_window import (
    gaussian_importance,
    mirror_sets,
    sliding_window,
    window_starts,
)
from masksam_core.progress import drive


@pytest.mark.parametrize(
    "shape,patch",
    [
        ((13, 37, 29), (4, 16, 16)),  # odd shapes
        ((3, 10, 7), (4, 16, 16)),  # smaller than a patch on every axis
        ((30, 20, 50), (2, 32, 8)),  # anisotropic patch, smaller in-plane on one axis
        ((8, 16, 16), (8, 16, 16)),  # exactly one patch
    ],
)
@pytest.mark.parametrize("mirror", [(), (0, 1, 2)])
def test_double_predictor_stitches_to_double_input(shape, patch, mirror):
    torch.manual_seed(0)
    volume = torch.randn(2, *shape)
    out = drive(sliding_window(volume, lambda x: 2 * x, patch, batch_size=3, mirror_axes=mirror))
    assert out.shape == volume.shape
    torch.testing.assert_close(out, 2 * volume, rtol=1e-5, atol=1e-5)


def test_short_volume_sits_in_the_window_where_training_patches_put_it():
    # A volume shorter than the patch reaches the network centred in the window, exactly as the training
    # sampler pads it (padding at the end only shows the network a layout it never trained on).
    volume = torch.randn(1, 3, 10, 7)
    seen = []

    def predictor(x):
        seen.append(x.clone())
        return x

    out = drive(sliding_window(volume, predictor, (4, 16, 16)))
    labels = np.zeros((3, 10, 7), np.int16)
    image, _ = PatchSampler((4, 16, 16)).sample(volume.numpy(), labels, np.random.default_rng(0))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0], torch.from_numpy(image))
    torch.testing.assert_close(out, volume)


def test_flip_equivariant_predictor_returns_its_own_output():
    # a per-voxel function commutes with flips: TTA must give the same as no TTA
    volume = torch.randn(1, 9, 20, 21)
    f = lambda x: torch.cat([x.sigmoid(), x.tanh()], dim=1)  # noqa: E731
    plain = drive(sliding_window(volume, f, (4, 8, 8)))
    tta = drive(sliding_window(volume, f, (4, 8, 8), mirror_axes=(0, 1, 2)))
    torch.testing.assert_close(tta, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, f(volume[None])[0], rtol=1e-5, atol=1e-6)


def test_window_starts_cover_with_half_overlap():
    assert window_starts(10, 16, 0.5) == [0]
    assert window_starts(16, 16, 0.5) == [0]
    starts = window_starts(100, 16, 0.5)
    assert starts[0] == 0 and starts[-1] == 84
    assert all(b - a <= 8 for a, b in itertools.pairwise(starts))


def test_progress_counts_windows_and_mirrors_counted_once():
    calls = []

    def predictor(x):
        calls.append(x.shape[0])
        return x

    gen = sliding_window(torch.zeros(1, 8, 32, 32), predictor, (4, 16, 16), batch_size=2, mirror_axes=(1, 2))
    progress = []
    drive(gen, progress.append)
    # windows: z starts [0, 2, 4], y/x starts [0, 8, 16] each -> 27 windows, 14 batches
    assert progress[-1].done == progress[-1].total == 27
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert len(calls) == 14 * 4 and len(mirror_sets((1, 2))) == 4


def test_gaussian_weights_positive_and_peaked():
    w = gaussian_importance((5, 16, 16))
    assert w.min() > 0 and w.max() == 1
    assert w[2, 7:9, 7:9].min() == w.max()


@pytest.mark.parametrize(
    "kwargs,match",
    [({"overlap": 1.0}, "overlap"), ({"batch_size": 0}, "batch_size"), ({"mirror_axes": (3,)}, "mirror_axes")],
)
def test_bad_arguments_are_rejected_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        next(sliding_window(torch.zeros(1, 4, 4, 4), lambda x: x, (2, 2, 2), **kwargs))


def test_bad_volume_shape_is_rejected():
    with pytest.raises(ValueError, match=r"\(C, Z, Y, X\)"):
        next(sliding_window(torch.zeros(4, 4, 4), lambda x: x, (2, 2, 2)))
