"""Training logs: a tqdm bar, ``OUT/metrics.jsonl`` and TensorBoard events, from rank 0 only.

``metrics.jsonl`` holds one JSON object per logged step. When a run resumes from step ``s``, lines
after ``s`` (written by the interrupted run after its last checkpoint) are dropped first, so the file
reads as if the run had never stopped. TensorBoard is used when it is installed (the ``train``
extra); otherwise one line says so.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..io.files import atomic_write

__all__ = ["METRICS_FILE", "TB_DIR", "RunLogger", "trim_metrics", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a kill mid-write, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def trim_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep only the records of steps ``<= step`` (atomically)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_write(path, lambda f: f.write(text.encode()))


def _fmt(value: float) -> str:
    return f"{value:.4g}"


class RunLogger:
    """Where a run's numbers go. Every method is a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, out: Path, *, enabled: bool, start_step: int, total: int, progress: bool):
        self.enabled = enabled
        self.metrics_path = out / METRICS_FILE
        self._bar = None
        self._tb = None
        if not enabled:
            return
        trim_metrics(self.metrics_path, start_step)
        self._file = open(self.metrics_path, "a")  # noqa: SIM115 (closed in close())
        self._bar = tqdm(
            total=total, initial=start_step, disable=not progress, dynamic_ncols=True, desc="train", file=sys.stderr
        )
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.info("TensorBoard logging is off (pip install 'vocabseg[train]' to turn it on); see metrics.jsonl.")
        else:
            # purge_step hides events an interrupted run wrote after its last checkpoint
            self._tb = SummaryWriter(str(out / TB_DIR), purge_step=start_step + 1)

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        """Write one step's record (``step`` plus numbers) to every sink."""
        if not self.enabled:
            return
        step = record["step"]
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=_fmt(record["loss"]), lr=_fmt(record.get("lr", float("nan"))), refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
