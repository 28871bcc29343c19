"""The one progress-bar layout every long step uses (rich: description, bar, n/N, ETA)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

#: seconds between the plain progress lines written where there is no terminal
LOG_EVERY_S = 30.0


class _Progress(Progress):
    """A rich Progress that, where its console is no terminal (a log file, CI, a service),
    also prints one plain line per task at most every ``LOG_EVERY_S`` seconds and when the
    task completes: rich draws nothing there until the end."""

    def __init__(self, *columns: Any, every_s: float = LOG_EVERY_S, **kw: Any) -> None:
        super().__init__(*columns, **kw)
        self._every_s = every_s
        self._last: dict[TaskID, float] = {}
        self._done: set[TaskID] = set()

    def update(self, task_id: TaskID, **kw: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kw)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if self.console.is_terminal or task_id in self._done:
            return
        task = self._tasks[task_id]
        done = task.total is not None and task.completed >= task.total
        now = time.monotonic()
        if not done and now - self._last.get(task_id, -float("inf")) < self._every_s:
            return
        self._last[task_id] = now
        if done:
            self._done.add(task_id)
        total = f"/{task.total:g}" if task.total is not None else ""
        left = task.time_remaining
        eta = f", about {left / 60:.1f} min left" if left and not done else ""
        info = task.fields.get("info")
        extra = f" {info}" if info else ""
        self.console.print(
            f"{task.description}: {task.completed:g}{total}{eta}{extra}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def progress_bar(*, info: bool = False, console: Console | None = None) -> Progress:
    """A rich Progress; with ``info`` a task's ``info`` field (e.g. the loss) is shown too.
    Without a terminal it prints plain progress lines instead (see :class:`_Progress`)."""
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return _Progress(*columns, TimeRemainingColumn(), console=console)
