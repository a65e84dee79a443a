"""The typed plans: ``Plans.from_dict`` / ``to_dict`` keep plans.json and checkpoint plans exactly as they are."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import masksam_core
from masksam_core.data.plans import Normalization, Plans, PlansError, make_plans

BUNDLED_MODEL = Path(masksam_core.__file__).parent / "assets" / "abdomen-ct-lite.pt"


def _fresh_plans(channels: dict[str, str]) -> dict:
    """A plans dict as ``make_plans`` writes it, from a two-case fingerprint (no files needed)."""
    spec = SimpleNamespace(name="Dataset900_CT", channel_names=channels,
                           labels={"background": 0, "organ": 1, "lesion": 2})
    stats = {"mean": 60.0, "std": 40.0, "median": 61.0, "min": -20.0, "max": 200.0,
             "percentile_00_5": -5.0, "percentile_99_5": 180.0, "num_samples": 20_000}
    fingerprint = {"spacings": [[2.0, 1.0, 1.0], [2.5, 1.0, 1.0]], "shapes": [[12, 24, 20], [10, 22, 24]],
                   "foreground_intensity": dict.fromkeys(channels, stats)}
    return make_plans(spec, fingerprint, "tiny").to_dict()


def test_plans_dicts_survive_the_typed_form():
    """Keys, their order and the types of the values (2 is not 2.0, a list not a tuple) all come back."""
    fresh = _fresh_plans({"0": "CT", "1": "T2"})
    bundled = torch.load(BUNDLED_MODEL, map_location="cpu", weights_only=True)["plans"]
    for plans in (fresh, bundled, dict(fresh, mirror_axes=[0, 1, 2]), dict(fresh, mirror_axes=[])):
        assert json.dumps(Plans.from_dict(plans).to_dict()) == json.dumps(plans)
    assert json.loads(json.dumps(fresh)) == fresh  # JSON-able as it stands
    typed = Plans.from_dict(bundled)
    assert typed.stats is not None and typed.stats.median_shape == tuple(bundled["median_shape"])
    assert typed.normalization[0].scheme == "ct" and typed.separate_z.image_order == 3
    assert Plans.from_dict(fresh).normalization[1] == Normalization(1, "T2", "zscore")


def test_malformed_plans_are_plans_errors():
    fresh = _fresh_plans({"0": "CT"})
    with pytest.raises(PlansError, match=r"lack.*'num_classes'"):
        Plans.from_dict({k: v for k, v in fresh.items() if k != "num_classes"})
    with pytest.raises(PlansError, match=r"unknown entries.*'extra'"):
        Plans.from_dict(dict(fresh, extra=1))
    with pytest.raises(PlansError, match="only part of"):
        Plans.from_dict({k: v for k, v in fresh.items() if k != "num_cases"})
    with pytest.raises(PlansError, match="malformed"):
        Plans.from_dict(dict(fresh, separate_z={"threshold": 3.0}))
