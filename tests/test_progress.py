"""Long work shows progress in a log file too (rich draws nothing there until the end)."""

from __future__ import annotations

import io

from rich.console import Console

from voxfit._progress import progress_bar


def _bar(terminal: bool) -> tuple[io.StringIO, object]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=120)
    return out, progress_bar(info=True, console=console)


def test_without_a_terminal_progress_is_printed_as_plain_lines() -> None:
    out, bar = _bar(terminal=False)
    with bar:  # type: ignore[attr-defined]
        t = bar.add_task("measure on dev", total=3, info="")  # type: ignore[attr-defined]
        for i in range(3):
            bar.update(t, completed=i + 1, info=f"{i + 1.5:.1f} ms")  # type: ignore[attr-defined]
    lines = [x for x in out.getvalue().splitlines() if x.startswith("measure on dev:")]
    # the first update, then (within 30 s) only the completion, once
    assert lines[0] == "measure on dev: 1/3 1.5 ms"
    assert lines[1:] == ["measure on dev: 3/3 3.5 ms"]


def test_a_terminal_gets_the_bar_only() -> None:
    out, bar = _bar(terminal=True)
    with bar:  # type: ignore[attr-defined]
        t = bar.add_task("tune", total=2, info="")  # type: ignore[attr-defined]
        bar.advance(t, 2)  # type: ignore[attr-defined]
    assert "tune: 2/2" not in out.getvalue()
    assert "2/2" in out.getvalue()  # rich's own bar
