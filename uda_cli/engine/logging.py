"""Run logging: metrics.jsonl, and the console in one of three formats (``--log-format``).

- ``auto`` (default): a rich progress bar on a terminal; ``text`` when stderr is not one.
- ``text``: one plain line per log record on stderr; no bar, no colour, no cursor moves.
- ``json``: one JSON object per line on stderr: the ``train``/``eval`` records that also go
  to metrics.jsonl, and ``{"kind": "info", "time", "message"}`` for everything else.

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train", "step", "time",
"lr/<group>", "<loss>", "it_s", "img_s"}`` every ``log_every`` steps and ``{"kind":
"eval", "step", "domain", "accuracy", ...}`` after each evaluation. On resume, records of
steps after the checkpoint (written by the interrupted run) are dropped first, so the file
reads as one uninterrupted run. In a run on several processes only rank 0 logs (a logger
with ``enabled=False`` writes nothing); losses are means over the ranks and ``img_s``
counts the images of all ranks.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from uda_cli.errors import os_errors

_ADVICE = "check that the run folder is writable and has space"


def stderr_console() -> Console:
    return Console(stderr=True, soft_wrap=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order; a line cut off by a kill is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, max_step: int) -> None:
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_metrics(path) if int(r.get("step", 0)) <= max_step]
    with os_errors("write", path, _ADVICE):
        path.write_text("".join(k + "\n" for k in kept))


LOG_FORMATS = ("auto", "text", "json")


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, interactive: bool | None = None,
                 enabled: bool = True, fmt: str = "auto"):
        if fmt not in LOG_FORMATS:
            raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.console = stderr_console()
        self.json = fmt == "json"
        if fmt == "auto":  # ``interactive`` (tests, callers) overrides the terminal check
            self.interactive = self.console.is_terminal if interactive is None else interactive
        else:
            self.interactive = False
        self.total, self.start = total_steps, start_step
        self._progress = None
        self._task = None
        self._file = None
        if enabled:
            with os_errors("write", self.path, _ADVICE):
                run_dir.mkdir(parents=True, exist_ok=True)
                truncate_metrics(self.path, start_step)
                self._file = open(self.path, "a", buffering=1)

    def __enter__(self) -> "RunLogger":
        if self.enabled and self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
                console=self.console, transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start, rate="", losses="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            with os_errors("write", self.path, _ADVICE):
                self._file.write(json.dumps(record) + "\n")

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    @staticmethod
    def _line(text: str) -> None:
        # One write per line: print() writes the text and the newline separately, and stderr
        # is unbuffered, so lines of processes sharing a pipe (torchrun, srun) could interleave.
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def _emit_json(self, record: dict[str, Any]) -> None:
        self._line(json.dumps(record))

    def train(self, step: int, values: dict[str, float], it_s: float, img_s: float) -> None:
        if not self.enabled:
            return
        record = {"kind": "train", "step": step, "time": time.time(), **values, "it_s": it_s, "img_s": img_s}
        self.write(record)
        if self.json:
            self._emit_json(record)
            return
        losses = " ".join(f"{k} {v:.4f}" for k, v in values.items() if not k.startswith("lr/"))
        rate = f"{it_s:.1f} it/s {img_s:.0f} img/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, rate=rate, losses=losses)
        else:
            self.info(f"step {step}/{self.total} | {losses} | {rate}")

    def eval(self, step: int, domain: str, report: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": "eval", "step": step, "time": time.time(), "domain": domain}
        if report.get("metric") == "miou":
            record.update({k: v for k, v in report.items() if k.startswith("miou") or k == "pixel_accuracy"})
        else:
            record.update(accuracy=report["accuracy"], mean_class_accuracy=report["mean_class_accuracy"])
        self.write(record)
        if self.json:
            self._emit_json(record)
            return
        if report.get("metric") == "miou":
            self.info(f"step {step}: {domain} mIoU {100 * report['miou']:.2f}")
        else:
            self.info(f"step {step}: {domain} accuracy {100 * report['accuracy']:.2f}%")

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.json:
            self._emit_json({"kind": "info", "time": time.time(), "message": msg})
        elif self._progress is not None:
            self._progress.console.print(msg, markup=False, highlight=False)
        else:
            self._line(msg)
