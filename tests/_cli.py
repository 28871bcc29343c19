"""Run ``voxfit`` in-process through its real entry point (tests of CLI commands)."""

from __future__ import annotations

import sys

import pytest

from voxfit.cli import main


def run_voxfit(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """``voxfit ARGS`` through the real entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["voxfit", *args])
    with pytest.raises(SystemExit) as e:
        main()
    got = capsys.readouterr()
    return int(e.value.code or 0), got.out, got.err
