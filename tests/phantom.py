"""A small synthetic 3D data set in the nnU-Net raw layout, made for tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def make_phantom_dataset(root: Path, *, cases: int = 3, shape: tuple[int, int, int] = (64, 64, 16),
                         seed: int = 0, gap: float | None = None) -> Path:
    """Write ``cases`` phantoms (nibabel array shape (X, Y, Z), 1 mm in-plane, 2 mm slices):
    a ball (label 1) and a box (label 2) at random places in noisy background (std 30).
    Intensities: background ~100, ball ~300, box ~500 (CT-like, so the CT scheme is used).

    ``gap``: None places the box independently of the ball (they may touch or overlap; the ball wins);
    a number keeps at least that many millimetres of background between them."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for i in range(cases):
        labels = np.zeros(shape, np.uint8)
        c = rng.uniform([16, 16, 5], [48, 48, 11])
        distance = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + ((z - c[2]) * 2) ** 2)  # mm from the centre
        radius = rng.uniform(8, 12)
        labels[distance < radius] = 1
        for _ in range(1000):
            b0 = rng.integers([4, 4, 2], [20, 20, 6])
            size = rng.integers([10, 10, 4], [16, 16, 8])
            box = (slice(b0[0], b0[0] + size[0]), slice(b0[1], b0[1] + size[1]), slice(b0[2], b0[2] + size[2]))
            if gap is None or distance[box].min() >= radius + gap:
                break
        else:
            raise ValueError(f"no room for a box {gap} mm away from the ball in a {shape} phantom")
        labels[box][labels[box] == 0] = 2
        image = 100 + 200 * (labels == 1) + 400 * (labels == 2) + rng.normal(0, 30, shape)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"ph_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), root / "labelsTr" / f"ph_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": root.name,
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "ball": 1, "box": 2},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }, indent=2))
    return root
