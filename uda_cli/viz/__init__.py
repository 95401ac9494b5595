"""What a person looks at: image grids (``grids``), t-SNE maps (``tsne``), and the progress
of the long passes that produce them.

:class:`Progress` is a rich bar on a terminal and a plain line every ~10% elsewhere (logs,
CI), on stderr so stdout stays for results. (The training loop has its own in
``engine/logging.py``; this one is for one-shot passes: translating a dataset, extracting
features, optimising an embedding.)

No torch here: nothing in this package is imported by ``uda --help``.
"""

from __future__ import annotations

import time


class Progress:
    """``with Progress("translate", total) as p: p.advance(n)``."""

    def __init__(self, label: str, total: int, completed: int = 0, interactive: bool | None = None, unit: str = ""):
        from uda_cli.engine.logging import stderr_console

        self.console = stderr_console()
        self.interactive = self.console.is_terminal if interactive is None else interactive
        self.label, self.total, self.done, self.unit = label, max(int(total), 0), int(completed), unit
        self._bar = None
        self._task = None
        self._next_line = 0
        self._printed = -1
        self._t0 = time.perf_counter()

    def __enter__(self) -> "Progress":
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done)
        else:
            self._line()
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif self.total and self.done >= self._next_line:
            self._line()

    def _line(self) -> None:
        pct = 100 * self.done / self.total if self.total else 100.0
        unit = f" {self.unit}" if self.unit else ""
        self.console.print(f"{self.label}: {self.done}/{self.total}{unit} ({pct:.0f}%, "
                           f"{time.perf_counter() - self._t0:.1f}s)", markup=False, highlight=False)
        self._printed = self.done
        self._next_line = self.done + max(self.total // 10, 1)

    def __exit__(self, exc_type, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif exc_type is None and self.done != self._printed:
            self._line()  # the final count, unless the last line already said it
