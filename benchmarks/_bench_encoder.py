"""Image-encoder throughput of each SAM backbone, with random (architecture-exact) weights.

FLOPs per image are counted once per (backbone, input size) with
``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (no memory, no compute): every
matmul, linear, convolution and batched matmul of the forward pass; attention runs through SDPA's
math path there, so its two matmuls (Q·Kᵀ and A·V) count as batched matmuls, 4·N²·d per head.
Element-wise work (softmax, norms, GELU) is not counted. SAM ViT-B at 1024² counts 972 GFLOP.
"""

from __future__ import annotations

import statistics
from functools import cache
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ._bench_common import autocast, time_calls

VIT_BACKBONES = ("vit_b", "vit_l", "vit_h")
FIXED_SIZES = {"lite": (256,), "tiny": (64,)}  # LiteMedSAM's TinyViT takes 256² only; tiny's own size


def encoder_sizes(backbone: str, vit_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Input sides to measure for ``backbone``: ``vit_sizes`` for the SAM ViTs, else its fixed size."""
    return vit_sizes if backbone in VIT_BACKBONES else FIXED_SIZES.get(backbone, (256,))


def build_encoder(backbone: str, image_size: int, device: torch.device | str) -> torch.nn.Module:
    """The image encoder of ``backbone`` for ``image_size``² slices, random weights, built on ``device``."""
    from masksam_core.modeling import build_backbone

    with torch.device(device):
        return build_backbone(backbone, image_size=image_size).image_encoder.eval()


@cache
def encoder_flops(backbone: str, image_size: int) -> int:
    """FLOPs of one image (1, 3, S, S) through the encoder, counted on the meta device.

    Counted with autograd on (only the forward runs): that is the reference code path of every
    module; inference-only fast paths compute the same function with the same matrix products.
    """
    encoder = build_encoder(backbone, image_size, "meta")
    with FlopCounterMode(display=False) as counter:
        encoder(torch.empty(1, 3, image_size, image_size, device="meta"))
    return int(counter.get_total_flops())


def encoder_item(backbone: str, image_size: int, batch: int, device: torch.device, amp: torch.dtype | None,
                 *, warmup: int, repeats: int, compile: bool = False) -> dict[str, Any]:
    """Throughput of ``backbone``'s encoder on batches (batch, 3, S, S) of random images.

    Returns images/s, ms per image, GFLOP per image and achieved TFLOP/s (GFLOP × images/s), from the
    median time per batch. With ``compile`` the encoder runs through ``torch.compile``; its first call
    (the compilation) is timed apart as ``first_call_s`` and is not among the timed calls.
    """
    flops = encoder_flops(backbone, image_size)
    torch.manual_seed(0)
    encoder = build_encoder(backbone, image_size, device)
    network = torch.compile(encoder) if compile else encoder
    x = torch.randn(batch, 3, image_size, image_size, device=device)

    def call() -> None:
        with torch.no_grad(), autocast(device, amp):
            network(x)

    first = time_calls(call, device, warmup=0, repeats=1)[0]
    times = time_calls(call, device, warmup=max(warmup - 1, 0), repeats=repeats)
    median = statistics.median(times)
    images_per_s = batch / median
    return {
        "compiled": compile,
        "first_call_s": first,
        "gflop_per_image": flops / 1e9,
        "images_per_s": images_per_s,
        "ms_per_image": 1000 / images_per_s,
        "tflops": flops * images_per_s / 1e12,
        "median_s_per_batch": median,
        "times_s": [round(t, 6) for t in times],
    }
