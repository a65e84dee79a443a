"""The MaskSAM benchmark suite: one command, on a CPU or a GPU, writing JSON and a Markdown table.

    python benchmarks/run.py                    # GPU: the full sizes below (bf16 autocast)
    python benchmarks/run.py --quick            # CPU: small sizes, about a minute on 2 cores
    python benchmarks/run.py --parts predict --presets lite tiny --volume 64 256 256 --no-tta

Writes ``benchmarks/results/suite_<device>.json`` and ``.md`` (``--out`` another folder) after every
item, so a run that is stopped, fails or runs out of memory keeps what it measured; an item that runs
out of memory (GPU or CPU) is recorded as ``oom``, any other failure as ``error`` with its message.
Exit status 1 when an item failed with an error.

Parts (``--parts encoder,predict,train``):

1. **encoder**: images/s of each backbone's image encoder (``--backbones``; SAM ViTs at
   ``--vit-sizes``, default 1024² and 256²; LiteMedSAM's TinyViT at 256²; ``tiny`` at 64²), random
   (architecture-exact) weights, and the achieved TFLOP/s as a fraction of a dense square matmul
   measured in the same run (bf16 on a GPU, fp32 on the CPU). FLOPs are counted with
   ``torch.utils.flop_counter.FlopCounterMode`` (see ``_bench_encoder``).
2. **predict**: whole-volume prediction of a synthetic CT (``--volume``, default 128×512×512 at
   ``--spacing`` 3.0×0.78×0.78 mm) with a random model of each preset (``--presets``) through
   ``Predictor``, with and without 8× mirror TTA, next to nnU-Net's default 3d_fullres network
   (``PlainConvUNet``, planned for that shape by nnU-Net v2's rules: ``_bench_nnunet``) through the same
   half-overlap Gaussian sliding window with the same mirroring, on the same volume and device.
3. **train**: seconds per training step and peak memory of each preset at batch size 2 (``Trainer``'s
   own forward, criterion, backward and optimiser step: ``_bench_train``). GPU memory is
   ``torch.cuda.max_memory_allocated``; CPU memory is the process's peak resident set (VmHWM, reset
   per item through ``/proc/self/clear_refs``). ``--grad-checkpointing`` recomputes the image encoder's
   blocks, the prompt generator's stages and the mask decoder in the backward pass, as ``masksam-core
   train --grad-checkpointing`` does (recorded in each row's ``grad_checkpointing``); without it the
   suite trains without recomputation on every device (the trainer's CPU default recomputes).

Windows per 128×512×512 volume (×8 network passes with TTA): nnU-Net 125 (48×192×192), acdc 567
(4×256×256, ViT-B at 1024²), synapse 81 (26×256×256), amos 28 (9×512×512), lite 567 (4×256×256),
tiny 14,175 (4×64×64). On a GPU with little time, split the run (``--parts``, ``--presets``, ``--tag``
names the files ``suite_<device>_<tag>``) and/or pass ``--tta-limit SECONDS``, which skips a model's
TTA run (recorded as ``skipped`` with its estimate) when 8× its run without TTA would exceed it.

On CUDA the networks run under bf16 autocast, as ``Predictor`` and the trainer do (``--amp``); the
suite sets no ``torch.backends`` flags because ``Predictor`` sets none (their values are recorded).
Each timing follows warm-up calls and ends with ``torch.cuda.synchronize``. ``--compile`` runs the
encoders and MaskSAM's networks through ``torch.compile`` (``Predictor(compile=True)``, as ``masksam-core
predict --compile``); the first call, which compiles, is timed apart (``first_call_s``). nnU-Net's network
and the training step stay eager, as nnU-Net's predictor and ``masksam-core train`` run them.

``--quick`` (for CPUs; the full sizes take hours there): encoders at 256² only (ViTs), one image per
batch; prediction and training with the ``tiny`` preset only, on an 8×96×96 volume (nnU-Net planned
for that shape); 1 warm-up and 2 timed repeats. Any option given explicitly wins.

Requirements: masksam_core (``pip install -e .`` or ``PYTHONPATH=src``) with ``segment-anything`` and,
for the nnU-Net comparison, ``dynamic-network-architectures`` (``--no-nnunet`` skips it); the train
part also imports masksam_core's training pipeline (monai, nibabel, matplotlib, tifffile, scipy).
Missing packages stop the run before any timing, with their names. On a machine without internet,
carry the wheels in the working tree and install them there without dependencies::

    pip download --no-deps segment-anything dynamic-network-architectures -d wheels/   # with internet
    pip install --no-deps wheels/*.whl                                                 # on the machine
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._bench_common import guarded, loadavg, machine_info, matmul_peak
from benchmarks._bench_report import markdown

BACKBONES = ("vit_b", "vit_l", "vit_h", "lite", "tiny")
PRESETS = ("acdc", "synapse", "amos", "lite", "tiny")
PARTS = ("encoder", "predict", "train")
QUICK = {"vit_sizes": [256], "presets": ["tiny"], "volume": [8, 96, 96], "warmup": 1, "repeats": 2}
RESULTS = Path(__file__).resolve().parent / "results"


class MissingPackage(SystemExit):
    """A package the requested parts need is not installed (the message says how to install it)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cuda, cuda:N, mps or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes for a CPU (see above)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: encoder,predict,train")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--vit-sizes", nargs="+", type=int, default=None, help="ViT input sides (1024 256)")
    parser.add_argument("--encoder-batch", type=int, default=None,
                        help="images per encoder call (GPU: 8 at 1024², 32 at 256²; CPU: 1)")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=None, help="for predict and train")
    parser.add_argument("--volume", nargs=3, type=int, default=None, metavar=("Z", "Y", "X"),
                        help="synthetic CT shape (128 512 512)")
    parser.add_argument("--spacing", nargs=3, type=float, default=[3.0, 0.78, 0.78], metavar=("SZ", "SY", "SX"))
    parser.add_argument("--no-tta", action="store_true", help="predict without mirror TTA only")
    parser.add_argument("--no-nnunet", action="store_true", help="skip the nnU-Net comparison")
    parser.add_argument("--tta-limit", type=float, default=None, metavar="SECONDS",
                        help="skip a model's TTA run when 8× its run without TTA would take longer")
    parser.add_argument("--window-batch", type=int, default=1, help="windows per network call (Predictor: 1)")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="train part: recompute the encoder, prompt generator and decoder in backward "
                        "(masksam-core train's flag)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (GPU 3, CPU 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (GPU 10, CPU 3)")
    parser.add_argument("--matmul-size", type=int, default=None, help="side of the reference matmul")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoders and MaskSAM networks")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for suite_<device>.json/.md")
    parser.add_argument("--tag", default="", help="file name suffix: suite_<device>_<tag>.json/.md")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return args


def resolve(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The settings of this run: explicit options, else --quick's, else the device's defaults."""
    gpu = device.type == "cuda"
    quick = QUICK if args.quick else {}

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else quick.get(name, default)

    custom = any(getattr(args, n) is not None for n in ("vit_sizes", "presets", "volume", "encoder_batch")) or \
        args.backbones != list(BACKBONES) or args.no_tta or args.no_nnunet or args.parts != list(PARTS)
    return {
        "mode": "quick" if args.quick else "custom" if custom else "full",
        "parts": args.parts, "backbones": args.backbones,
        "vit_sizes": pick("vit_sizes", [1024, 256]),
        "encoder_batch": args.encoder_batch,
        "presets": pick("presets", list(PRESETS)),
        "volume": pick("volume", [128, 512, 512]), "spacing": args.spacing,
        "tta": [False] if args.no_tta else [False, True], "nnunet": not args.no_nnunet, "tta_limit": args.tta_limit,
        "amp": args.amp, "compile": args.compile,
        "window_batch": args.window_batch, "train_batch": args.train_batch,
        "grad_checkpointing": args.grad_checkpointing,
        "warmup": pick("warmup", 3 if gpu else 1), "repeats": pick("repeats", 10 if gpu else 3),
        "matmul_size": pick("matmul_size", 8192 if gpu else 2048),
    }


# What each part imports from masksam_core (a missing third-party module shows up here, before any timing).
PART_MODULES = {
    "encoder": ("masksam_core.modeling",),
    "predict": ("masksam_core.inference.predictor", "masksam_core.runs"),
    "train": ("masksam_core.training.trainer",),
}
PIP_NAMES = {"segment_anything": "segment-anything", "dynamic_network_architectures": "dynamic-network-architectures",
             "PIL": "pillow", "skimage": "scikit-image", "yaml": "pyyaml", "SimpleITK": "SimpleITK"}


def check_packages(settings: dict[str, Any]) -> None:
    """Stop with a clear message when a package the requested parts need is missing."""
    missing: dict[str, list[str]] = {}
    if importlib.util.find_spec("masksam_core") is None:
        raise MissingPackage("benchmark suite: masksam_core is not importable: run `pip install -e .` in the "
                             "repository (add --no-deps on a machine without internet) or set PYTHONPATH=src")
    for part in settings["parts"]:
        for module in PART_MODULES[part]:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as error:
                name = (error.name or str(error)).split(".")[0]
                missing.setdefault(PIP_NAMES.get(name, name.replace("_", "-")), []).append(part)
    if "predict" in settings["parts"] and settings["nnunet"] and \
            importlib.util.find_spec("dynamic_network_architectures") is None:
        missing.setdefault("dynamic-network-architectures", []).append("predict (nnU-Net comparison; "
                                                                      "--no-nnunet skips it)")
    if missing:
        lines = [f"  - {package} (needed by: {', '.join(dict.fromkeys(parts))})" for package, parts in missing.items()]
        raise MissingPackage(
            "benchmark suite: missing package(s):\n" + "\n".join(lines) +
            f"\nInstall them: pip install {' '.join(missing)}. Without internet: run `pip download --no-deps "
            f"{' '.join(missing)} -d wheels/` elsewhere, carry wheels/ along, then `pip install --no-deps "
            "wheels/*.whl` (or leave out the part that needs them with --parts).")


def encoder_batch(settings: dict[str, Any], device: torch.device, size: int) -> int:
    if settings["encoder_batch"]:
        return settings["encoder_batch"]
    if device.type != "cuda":
        return 1
    return max(1, min(256, 8 * 1024 // size))  # 8 at 1024², 32 at 256², 128 at 64²


class Suite:
    """Runs the parts and rewrites the JSON and Markdown files after every item."""

    def __init__(self, settings: dict[str, Any], device: torch.device, amp: torch.dtype | None, out: Path,
                 command: list[str], tag: str = "") -> None:
        self.settings, self.device, self.amp = settings, device, amp
        name = device.type + (f"_{tag}" if tag else "")
        self.json_path, self.md_path = out / f"suite_{name}.json", out / f"suite_{name}.md"
        self.results: dict[str, Any] = {
            "suite": "napari-masksam benchmark suite", "format": 1, "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": settings,
            "machine": machine_info(device), "amp": str(amp).replace("torch.", "") if amp else "off",
            "flops_method": "torch.utils.flop_counter.FlopCounterMode on the meta device (matmul, linear, conv, "
                            "bmm; attention as two batched matmuls); element-wise work not counted",
            "matmul": None, "encoder": [], "nnunet_plan": None, "predict": [], "train": [],
        }
        out.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        self.results["machine"]["load_average_end"] = loadavg()
        self.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        for path, text in ((self.json_path, json.dumps(self.results, indent=2, default=str)),
                           (self.md_path, markdown(self.results))):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)

    def log(self, row: dict[str, Any], what: str) -> None:
        status = row.get("status")
        extra = row.get("error", "") if status != "ok" else ""
        print(f"[{time.strftime('%H:%M:%S')}] {what}: {status} {extra}", flush=True)
        self.save()

    def matmul(self) -> None:
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        row = guarded({}, self.device, matmul_peak, self.device, dtype, self.settings["matmul_size"],
                      warmup=self.settings["warmup"], repeats=max(self.settings["repeats"], 5))
        self.results["matmul"] = row
        self.log(row, f"matmul {row.get('dtype', '')} {self.settings['matmul_size']}³ "
                      f"{row.get('tflops', float('nan')):.3f} TFLOP/s")

    def encoder(self) -> None:
        from benchmarks._bench_encoder import encoder_item, encoder_sizes

        peak = (self.results["matmul"] or {}).get("tflops")
        for backbone in self.settings["backbones"]:
            for size in encoder_sizes(backbone, tuple(self.settings["vit_sizes"])):
                batch = encoder_batch(self.settings, self.device, size)
                row: dict[str, Any] = {"backbone": backbone, "image_size": size, "batch": batch}
                guarded(row, self.device, encoder_item, backbone, size, batch, self.device, self.amp,
                        warmup=self.settings["warmup"], repeats=self.settings["repeats"],
                        compile=self.settings["compile"])
                if row["status"] == "ok" and peak:
                    row["fraction_of_matmul"] = row["tflops"] / peak
                self.results["encoder"].append(row)
                self.log(row, f"encoder {backbone} {size}² {row.get('images_per_s', 0):.2f} images/s")

    def predict(self) -> None:
        from benchmarks._bench_predict import Predictors, synthetic_ct

        s = self.settings
        shape, spacing = tuple(s["volume"]), tuple(s["spacing"])
        volume = synthetic_ct(shape)
        models: list[tuple[str, Any]] = []
        if s["nnunet"]:
            from benchmarks._bench_nnunet import plan_3d_fullres

            plan = plan_3d_fullres(shape, spacing)
            self.results["nnunet_plan"] = {"shape": list(shape), **plan.to_dict()}
            models.append(("nnunet_3d_fullres", plan))
        models += [(f"masksam_{p}", p) for p in s["presets"]]
        predictors = Predictors(self.device, s["amp"], spacing, compile=s["compile"])
        try:
            self._predict_models(models, volume, spacing, predictors)
        finally:
            predictors.close()

    def _predict_models(self, models: list[tuple[str, Any]], volume: Any, spacing: tuple[float, ...],
                        predictors: Any) -> None:
        from benchmarks._bench_predict import masksam_item, nnunet_item

        s = self.settings
        shape = volume.shape
        for model, what in models:
            plain_s = None  # windows_s without TTA, for --tta-limit
            for tta in s["tta"]:
                row: dict[str, Any] = {"model": model, "tta": tta, "volume": list(shape)}
                if tta and s["tta_limit"] is not None and plain_s is not None and 8 * plain_s > s["tta_limit"]:
                    row.update(status="skipped", estimate_s=8 * plain_s,
                               error=f"about 8 × {plain_s:.0f} s expected, over --tta-limit {s['tta_limit']:g} s")
                    self.results["predict"].append(row)
                    self.log(row, f"predict {model} tta={tta}")
                    continue
                if model.startswith("nnunet"):
                    guarded(row, self.device, nnunet_item, what, volume, spacing, self.device, self.amp, tta=tta,
                            window_batch=s["window_batch"])
                else:
                    row["preset"] = what
                    guarded(row, self.device, masksam_item, predictors, what, volume, tta=tta,
                            window_batch=s["window_batch"])
                plain_s = row.get("windows_s") if not tta else plain_s
                self.results["predict"].append(row)
                self.log(row, f"predict {model} tta={tta} {row.get('seconds', float('nan')):.1f} s")

    def train(self) -> None:
        from benchmarks._bench_train import train_item

        s = self.settings
        for preset in s["presets"]:
            row: dict[str, Any] = {"preset": preset}
            guarded(row, self.device, train_item, preset, s["train_batch"], self.device,
                    warmup=s["warmup"], repeats=s["repeats"], grad_checkpointing=s["grad_checkpointing"])
            self.results["train"].append(row)
            self.log(row, f"train {preset} {row.get('seconds_per_step', float('nan')):.2f} s/step")

    def run(self) -> dict[str, Any]:
        self.save()
        if "encoder" in self.settings["parts"]:
            self.matmul()
            self.encoder()
        if "predict" in self.settings["parts"]:
            self.predict()
        if "train" in self.settings["parts"]:
            self.train()
        self.save()
        return self.results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite with command-line ``argv``; returns the results (also written to ``--out``)."""
    from masksam_core.devices import autocast_dtype, select_device

    args = parse_args(argv)
    device = select_device(args.device)
    settings = resolve(args, device)
    check_packages(settings)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        amp = autocast_dtype(device, args.amp)
        command = ["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]
        suite = Suite(settings, device, amp, args.out, command, args.tag)
        if settings["mode"] == "quick":
            print(f"quick mode: ViT encoders at {', '.join(f'{v}²' for v in settings['vit_sizes'])}, presets "
                  f"{' '.join(settings['presets'])}, volume {'×'.join(map(str, settings['volume']))}", flush=True)
        results = suite.run()
        print(f"wrote {suite.json_path} and {suite.md_path}", flush=True)
        return results
    finally:
        torch.set_num_threads(threads)


def failed(results: dict[str, Any]) -> list[str]:
    """Items that ended with an error (not out-of-memory)."""
    rows = [results.get("matmul") or {}] + results["encoder"] + results["predict"] + results["train"]
    return [json.dumps({k: v for k, v in r.items() if k in ("backbone", "image_size", "model", "tta", "preset")})
            for r in rows if r.get("status") == "error"]


if __name__ == "__main__":
    results = main()
    bad = failed(results)
    if bad:
        print("items that failed: " + "; ".join(bad), file=sys.stderr)
    sys.exit(1 if bad else 0)
