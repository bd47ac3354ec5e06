"""Progress on stderr with rich: an overall bar over every fio run, and the one running now with its time.

Under TCG a full matrix takes many minutes; a person watching should see which backend, path and job is running
and how far along the whole thing is. Without a terminal rich prints plain lines instead of redrawing.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RichProgress:
    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self.console, transient=False)
        self._task = self._progress.add_task("bench", total=None)

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def begin(self, total: int) -> None:
        self._progress.update(self._task, total=total, completed=0)

    def step(self, description: str, seconds: float | None = None) -> None:
        hint = f" (~{seconds:.0f} s)" if seconds else ""
        self._progress.update(self._task, description=f"{description}{hint}")
        if not self.console.is_terminal:
            self.console.print(f"bench: {description}{hint}", highlight=False)

    def done_step(self) -> None:
        self._progress.advance(self._task)

    def note(self, text: str) -> None:
        self.console.print(f"bench: {text}", highlight=False)
