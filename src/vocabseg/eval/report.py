"""Result files: ``result.json`` and a markdown report per benchmark, and a method x benchmark
summary table over every result in an output folder (the papers' table layout).

Every report states the protocol, the full settings and the metric convention, so a number always
says how it was made. Metrics are written in percent with two decimals; ``-`` marks a class that is
not scored (NaN: no pixels in the ground truth, and for mmseg none predicted either), ``null`` in the
JSON files, which are strict JSON (``allow_nan=False``: no ``NaN`` token other parsers refuse).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.registry import STANDARD_BENCHMARKS
from ..io.files import atomic_write_text

if TYPE_CHECKING:
    from .runner import EvalResult

CONVENTION_TEXT = {
    "mmseg": "mmseg IoUMetric (classes with zero union excluded; predicted-but-absent classes count as 0)",
    "detectron2": "detectron2 SemSegEvaluator (only classes present in the ground truth are scored)",
    "episodes": "PASCAL-5i (HSNet): mIoU over the fold's 5 classes, FB-IoU; counts summed over episodes",
}


def _json_safe(obj: Any) -> Any:
    """NaN and infinities -> null (JSON has neither), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def describe_settings(s: dict[str, Any]) -> str:
    window = "whole image" if s["crop"] == 0 else f"crop {s['crop']} / stride {s['stride']}"
    pamr = f"PAMR {s['pamr_steps']} steps {tuple(s['pamr_dilations'])}" if s["pamr_steps"] else "PAMR off"
    parts = [
        f"short side {s['short_side']} (long side <= {s['max_long_side']})",
        window,
        f"logit scale {s['logit_scale']:g}",
        f"prob threshold {s['prob_threshold']:g}",
        f"area threshold {s['area_threshold']:g}",
        pamr,
    ]
    if s.get("pad_multiple"):
        parts.append(f"windows padded to a multiple of {s['pad_multiple']}")
    return ", ".join(parts)


def result_stem(limit: int | None) -> str:
    return "result" if limit is None else f"result_limit{limit}"


def result_to_json(result: EvalResult) -> dict[str, Any]:
    return _json_safe(
        {
            "benchmark": result.benchmark,
            "metrics": result.metrics,
            "all_metrics": result.all_metrics,
            **result.info,
        }
    )


def format_markdown(result: EvalResult) -> str:
    info, m = result.info, result.metrics
    ds, proto = info["dataset"], info["protocol"]
    overrides = ", ".join(f"{k}={v}" for k, v in proto["overrides"].items())
    lines = [
        f"# {result.benchmark}: {info['method']} ({info['model']})",
        "",
        "| | |",
        "|---|---|",
        f"| benchmark | {ds['description']}; {ds['num_samples']} samples, {ds['num_classes']} classes, "
        f"{ds['label_handling']}, ignore {ds['ignore_index']} |",
        f"| data | {ds['root']} |",
        f"| protocol | {proto['name']}: {proto['source']}" + (f"; overrides: {overrides}" if overrides else "") + " |",
        f"| settings | {describe_settings(info['settings'])} |",
        f"| text | templates {info['templates']}, CLIP surgery {'on' if info['surgery'] else 'off'} |",
        f"| metric convention | {CONVENTION_TEXT[info['convention']]} |",
        f"| run | {info['num_evaluated']} samples" + (f" (limit {info['limit']})" if info["limit"] is not None else "")
        + f", {info['computed']} computed, {info['resumed']} resumed, {info['world_size']} process(es), "
        + (f"seed {info['seed']}, " if info.get("seed") is not None else "")
        + f"run id {info['run_id']} |",
    ]  # fmt: skip
    lines += [f"| note | {n} |" for n in ds["notes"]]
    lines.append("")
    if info["convention"] == "episodes":
        lines.append(f"**mIoU {_pct(m['mIoU'])}** · FB-IoU {_pct(m['FB-IoU'])}")
        rows = [(name, _pct(iou)) for name, iou in zip(ds["classes"], m["IoU"])]
        lines += ["", "| class | IoU |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]]
        return "\n".join(lines) + "\n"
    other = "detectron2" if info["convention"] == "mmseg" else "mmseg"
    lines.append(
        f"**mIoU {_pct(m['mIoU'])}** · aAcc {_pct(m['aAcc'])} · mAcc {_pct(m['mAcc'])} · fwIoU {_pct(m['fwIoU'])} "
        f"(with the {other} convention: mIoU {_pct(result.all_metrics[other]['mIoU'])})"
    )
    lines += ["", "| class | IoU | Acc |", "|---|---|---|"]
    lines += [f"| {c} | {_pct(i)} | {_pct(a)} |" for c, i, a in zip(ds["classes"], m["IoU"], m["Acc"])]
    return "\n".join(lines) + "\n"


def write_run_identity(run_dir: str | os.PathLike, identity: dict[str, Any]) -> None:
    """``run.json``: what the run id hashes (which model, settings and classes the records belong to)."""
    text = json.dumps(_json_safe(identity), indent=2, default=str, allow_nan=False)
    atomic_write_text(Path(run_dir) / "run.json", text)


def write_result(result: EvalResult) -> None:
    stem = result_stem(result.info["limit"])
    atomic_write_text(result.run_dir / f"{stem}.json", json.dumps(result_to_json(result), indent=2, allow_nan=False))
    atomic_write_text(result.run_dir / f"{stem}.md", format_markdown(result))


def _load_results(out_dir: Path) -> list[dict[str, Any]]:
    """The latest result of each run folder (a full result wins over a limited one)."""
    results = []
    for run_dir in sorted(p for p in out_dir.glob("*/*") if p.is_dir()):
        full = run_dir / "result.json"
        limited = sorted(run_dir.glob("result_limit*.json"), key=lambda p: p.stat().st_mtime)
        path = full if full.is_file() else (limited[-1] if limited else None)
        if path is not None:
            try:
                results.append(_json_safe(json.loads(path.read_text())))  # older versions wrote NaN
            except (OSError, json.JSONDecodeError):
                continue
    return results


def summary_table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per (method, model, protocol, configuration), one column per benchmark."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        row = rows.setdefault(r["row_id"], {"r": r, "cells": {}})
        mark = "*" if r.get("limit") is not None else ""
        row["cells"][r["benchmark"]] = (r["metrics"]["mIoU"], mark, r.get("seconds", 0))
    present = {b for row in rows.values() for b in row["cells"]}
    benchmarks = [b for b in STANDARD_BENCHMARKS if b in present] + sorted(present - set(STANDARD_BENCHMARKS))
    header = ["method", "model", "protocol", *benchmarks, "avg (standard 8)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows.values():
        r, cells = row["r"], row["cells"]
        values = [_pct(cells[b][0]) + cells[b][1] if b in cells else "" for b in benchmarks]
        standard = [cells[b][0] for b in STANDARD_BENCHMARKS if b in cells and cells[b][0] is not None]
        avg = _pct(sum(standard) / len(standard)) if standard else "-"
        if 0 < len(standard) < len(STANDARD_BENCHMARKS):
            avg += f" ({len(standard)} of {len(STANDARD_BENCHMARKS)})"
        cells_text = " | ".join([r["method"], r["model"], r["protocol"]["label"], *values, avg])
        lines.append(f"| {cells_text} |")
    notes = [
        "",
        "mIoU in %, headline convention of each run (mmseg IoUMetric unless stated in its report); "
        "PASCAL-5i columns: fold mIoU. `*`: evaluated on the first N images only (`--limit`).",
        "The full protocol, settings and per-class IoU of each cell are in `<benchmark>/<method>-<run id>/result.md`.",
    ]
    return "\n".join(["# Summary", "", *lines, *notes]) + "\n"


def pascal5i_table(results: list[dict[str, Any]]) -> str:
    """PASCAL-5i as the papers print it: per-fold mIoU, their mean, and the mean FB-IoU, one row per
    method, base model and protocol. Trained methods have different weights per fold (each fold's
    classes are held out of its own training), so rows are not split by weights here."""
    rows: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in results:
        name = r["benchmark"]
        if not name.startswith("pascal5i-") or r.get("limit") is not None:
            continue
        key = (r["method"], r["model"], r["protocol"]["label"])
        rows.setdefault(key, {})[int(name.rsplit("-", 1)[1])] = r["metrics"]
    if not rows:
        return ""
    lines = ["| method | model | protocol | fold 0 | fold 1 | fold 2 | fold 3 | mean mIoU | mean FB-IoU |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for (method, model, protocol), folds in rows.items():
        cells = [_pct(folds[f]["mIoU"]) if f in folds else "" for f in range(4)]
        complete = len(folds) == 4
        mean = _pct(sum(m["mIoU"] for m in folds.values()) / 4) if complete else f"- ({len(folds)} of 4 folds)"
        fb = _pct(sum(m["FB-IoU"] for m in folds.values()) / 4) if complete else "-"
        lines.append(f"| {method} | {model} | {protocol} | {' | '.join(cells)} | {mean} | {fb} |")
    return "\n".join(["", "## PASCAL-5i", "", *lines, ""])


def write_summary(out_dir: str | os.PathLike) -> Path | None:
    """``out_dir/summary.md`` and ``summary.json`` over every result under ``out_dir``."""
    out_dir = Path(out_dir)
    results = _load_results(out_dir)
    if not results:
        return None
    atomic_write_text(out_dir / "summary.md", summary_table(results) + pascal5i_table(results))
    atomic_write_text(out_dir / "summary.json", json.dumps(results, indent=2, allow_nan=False))
    return out_dir / "summary.md"
