"""``masksam-core info``: what a preset builds, and how many parameters it trains."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from .errors import MaskSAMError
from .modeling.presets import PRESETS, build_model, get_preset


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(tunable, frozen) parameter counts."""
    tunable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return tunable, frozen


def preset_info(name: str, *, num_classes: int | None = None, in_channels: int = 1) -> dict[str, Any]:
    """Facts about a preset; the model is built on the meta device (no memory, no weights)."""
    preset = get_preset(name)
    with torch.device("meta"):
        model = build_model(preset, pretrained=False, num_classes=num_classes, in_channels=in_channels)
    tunable, frozen = count_parameters(model)
    sam = model.sam
    return {
        "preset": preset.name,
        "backbone": preset.backbone,
        "description": preset.description,
        "patch_size": list(preset.patch_size),
        "sam_input_size": [sam.image_size, sam.image_size],
        "image_embedding_size": [sam.embedding_size, sam.embedding_size],
        "num_queries": preset.num_queries,
        "num_classes": model.num_classes,
        "in_channels": in_channels,
        "epochs": preset.epochs,
        "tunable_params": tunable,
        "frozen_params": frozen,
        "total_params": tunable + frozen,
    }


def format_info(info: dict[str, Any]) -> str:
    def m(n: int) -> str:
        return f"{n / 1e6:.2f}M ({n:,})"

    t, h, w = info["patch_size"]
    s = info["sam_input_size"][0]
    e = info["image_embedding_size"][0]
    rows = [
        ("preset", info["preset"]),
        ("", info["description"]),
        ("backbone", info["backbone"]),
        ("patch (T x H x W)", f"{t} x {h} x {w}"),
        ("SAM input per slice", f"{s} x {s} (image embedding {e} x {e})"),
        ("queries", str(info["num_queries"])),
        ("classes (with background)", str(info["num_classes"])),
        ("epochs", str(info["epochs"])),
        ("tunable parameters", m(info["tunable_params"])),
        ("frozen parameters", m(info["frozen_params"])),
        ("total parameters", m(info["total_params"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" if k else f"{'':<{width}}  ({v})" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    if args.num_classes is not None and args.num_classes < 2:
        raise MaskSAMError(f"--num-classes {args.num_classes}: counts the background too, so it is 2 or more")
    if args.in_channels < 1:
        raise MaskSAMError(f"--in-channels {args.in_channels}: a scan has 1 or more channels")
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    infos = [preset_info(n, num_classes=args.num_classes, in_channels=args.in_channels) for n in names]
    if args.json:
        print(json.dumps(infos[0] if len(infos) == 1 else infos, indent=2))
    else:
        print("\n\n".join(format_info(i) for i in infos))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show a preset's backbone, sizes and parameter counts",
        description="Show what a preset builds: backbone, patch and SAM input sizes, queries, and "
        "tunable, frozen and total parameter counts. Reads no weights.",
    )
    parser.add_argument(
        "--preset", default="all", choices=[*PRESETS, "all"], help="preset to describe (default: all)"
    )
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes incl. background (default: the preset's)")
    parser.add_argument("--in-channels", type=int, default=1, help="image channels (default: 1)")
    parser.add_argument("--json", action="store_true", help="print JSON (keys: preset, backbone, tunable_params, ...)")
    parser.set_defaults(func=run)
