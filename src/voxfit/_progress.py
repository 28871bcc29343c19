"""The one progress-bar layout every long step uses (rich: description, bar, n/N, ETA)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def progress_bar(*, info: bool = False) -> Progress:
    """A rich Progress; with ``info`` a task's ``info`` field (e.g. the loss) is shown too."""
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, TimeRemainingColumn())
