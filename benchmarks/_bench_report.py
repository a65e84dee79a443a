"""The Markdown report of a benchmark-suite result (the dict that ``run.py`` writes as JSON)."""

from __future__ import annotations

import math
from typing import Any


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        if value and abs(value) < 10 ** -digits:
            return f"{value:.2g}"
        return f"{value:,.{digits}f}"
    return str(value)


def _status(row: dict[str, Any]) -> str:
    return str(row.get("status", "not run"))


def _cell(row: dict[str, Any] | None, key: str, digits: int = 1) -> str:
    """A value of ``row``, or its status when it did not finish."""
    if row is None:
        return "not run"
    if row.get("status") == "skipped" and row.get("estimate_s"):
        return f"skipped (~{row['estimate_s']:.0f} s)"
    if row.get("status") != "ok":
        return _status(row)
    return _num(row.get(key), digits)


def _memory(rows: Any) -> str:
    """The largest peak of the finished rows, with the memory in use when that item started."""
    done = [r for r in rows if r.get("status") == "ok" and r.get("peak_memory_gib") is not None]
    if not done:
        return "–"
    top = max(done, key=lambda r: r["peak_memory_gib"])
    start = top.get("memory_at_start_gib")
    return _num(top["peak_memory_gib"]) + (f" ({_num(start)})" if start is not None else "")


def _machine(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    where = m.get("gpu") or m.get("processor")
    load = m.get("load_average_start"), m.get("load_average_end")
    s = results["settings"]
    lines = [
        f"Command: `{' '.join(results['command'])}` ({results['settings']['mode']} mode), "
        f"{results['started']} – {results.get('finished', '')}.",
        "",
        f"Machine: {where} ({m['device']}), {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}" + (f", CUDA {m['cuda']}" if m.get("cuda") else "") + f", code {m.get('git')}; "
        f"autocast {results['amp']}" + (", torch.compile" if s.get("compile") else ", eager (no torch.compile)") + ". "
        f"Load average (1/5/15 min) at start {load[0]}, at end {load[1]} "
        "(more than the thread count means other jobs shared the CPUs).",
        "",
        f"torch.backends: {', '.join(f'{k}={v}' for k, v in m['backends'].items())}.",
    ]
    quick = "Quick mode (smaller than the full suite): " if s["mode"] == "quick" else "Settings: "
    lines += ["", f"{quick}ViT encoders at {', '.join(f'{v}²' for v in s['vit_sizes'])}; presets "
              f"{', '.join(s['presets'])}; volume {'×'.join(map(str, s['volume']))}; TTA "
              f"{'on and off' if True in s['tta'] else 'off'}; {s['warmup']} warm-up and {s['repeats']} timed "
              "repeats per encoder and training item."]
    return lines


def _encoder(results: dict[str, Any]) -> list[str]:
    mm = results.get("matmul") or {}
    lines = ["## Image encoder throughput", "",
             f"Random weights; images/s from the median time per call. Reference: dense {mm.get('size', '?')}² "
             f"matmul in {mm.get('dtype', '?')}, best of {len(mm.get('times_s', []))} calls: "
             f"{_num(mm.get('tflops'), 3)} TFLOP/s ({_status(mm)}). "
             f"FLOPs: {results['flops_method']}.", "",
             "| backbone | input | batch | GFLOP/image | images/s | ms/image | TFLOP/s | % of matmul | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["encoder"]:
        frac = r.get("fraction_of_matmul")
        lines.append(
            f"| {r['backbone']} | {r['image_size']}² | {r['batch']} | {_cell(r, 'gflop_per_image', 1)} | "
            f"{_cell(r, 'images_per_s', 2)} | {_cell(r, 'ms_per_image', 2)} | {_cell(r, 'tflops', 3)} | "
            f"{_num(100 * frac, 1) if frac is not None else '–'} | {_status(r)} |")
    return lines


def _predict(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    rows = results["predict"]
    shape = "×".join(map(str, s["volume"]))
    lines = ["## Whole-volume prediction", "",
             f"Synthetic CT of {shape} voxels at {'×'.join(map(str, s['spacing']))} mm; half-overlapping "
             "windows, Gaussian weights; TTA = all 8 mirrorings (Z, Y, X) of each window; "
             f"{s['window_batch']} window(s) per network call. `windows s`: the sliding window alone "
             "(same code and volume for every model); `total s`: MaskSAM's whole `Predictor` call "
             "(normalisation, windows, back to the input grid, labels); nnU-Net: normalisation, windows "
             "and argmax.", ""]
    plan = results.get("nnunet_plan")
    if plan:
        lines += [f"nnU-Net 3d_fullres (nnU-Net v2 default planner for {shape} at "
                  f"{'×'.join(map(str, plan['spacing']))} mm): patch {'×'.join(map(str, plan['patch_size']))}, "
                  f"features {', '.join(map(str, plan['features_per_stage']))}, "
                  f"kernels {', '.join('×'.join(map(str, k)) for k in plan['kernel_sizes'])}, "
                  f"strides {', '.join('×'.join(map(str, k)) for k in plan['strides'])}.", ""]
    ttas = s["tta"]
    head = "| model | patch | windows |"
    for t in ttas:
        label = "8× TTA" if t else "no TTA"
        head += f" windows s ({label}) | total s ({label}) |"
    head += " ms per pass | peak memory, GiB (at start) |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        by_tta = {r["tta"]: r for r in rows if r["model"] == model}
        first = next((r for r in by_tta.values() if r.get("status") == "ok"), next(iter(by_tta.values())))
        patch = "×".join(map(str, first.get("patch_size", []))) or "–"
        line = f"| {model} | {patch} | {_num(first.get('windows'))} |"
        for t in ttas:
            r = by_tta.get(t)
            line += f" {_cell(r, 'windows_s')} | {_cell(r, 'seconds')} |"
        line += f" {_cell(first, 'ms_per_pass', 1)} | {_memory(by_tta.values())} |"
        lines.append(line)
    kinds = {r.get("memory_kind") for r in rows if r.get("memory_kind")}
    if kinds:
        lines += ["", f"Memory: {'; '.join(sorted(kinds))}; in brackets the memory in use when the item "
                  "started (on the CPU that includes memory the allocator kept from earlier items)."]
    return lines


def _train(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    lines = ["## Training step", "",
             f"Batch size {s['train_batch']}: the trainer's forward (autocast {results['amp']}), set criterion, "
             "backward, gradient clipping and AdamW step; median of the timed steps after warm-up"
             + ("; encoder blocks, prompt-generator stages and mask decoder recomputed in backward "
                  "(--grad-checkpointing)." if s.get("grad_checkpointing")
                else "; no gradient checkpointing."), "",
             "| preset | patch | trainable params (M) | s/step | peak memory, GiB (at start) | status |",
             "|---|---|---|---|---|---|"]
    for r in results["train"]:
        patch = "×".join(map(str, r.get("patch_size", []))) or "–"
        lines.append(f"| {r['preset']} | {patch} | {_cell(r, 'trainable_params_m', 2)} | "
                     f"{_cell(r, 'seconds_per_step', 2)} | {_memory([r])} | {_status(r)} |")
    kinds = {r.get("memory_kind") for r in results["train"] if r.get("memory_kind")}
    if kinds:
        lines += ["", f"Memory: {'; '.join(sorted(kinds))}, over the timed steps (weights, gradients and "
                  "optimiser state included); in brackets the memory in use before them."]
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The report: machine and settings, then one table per part that ran."""
    lines = ["# MaskSAM benchmark suite", "", *_machine(results)]
    if results["encoder"] or results.get("matmul"):
        lines += ["", *_encoder(results)]
    if results["predict"]:
        lines += ["", *_predict(results)]
    if results["train"]:
        lines += ["", *_train(results)]
    errors = [r for part in ("encoder", "predict", "train") for r in results[part] if r.get("status") != "ok"]
    if (results.get("matmul") or {}).get("status", "ok") != "ok":
        errors.insert(0, {"model": "matmul reference", **results["matmul"]})
    if errors:
        lines += ["", "## Items that did not finish", ""]
        lines += [f"- {r.get('backbone') or r.get('model') or r.get('preset')}: {r.get('status')} – "
                  f"{r.get('error', '')}" for r in errors]
    return "\n".join(lines) + "\n"
