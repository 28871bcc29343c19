"""``make postgres``'s entry point (``python -m voxfit.search._postgres start|stop ROOT``):
a server started from a folder, reused, reachable with the printed URL, stopped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from voxfit.search._postgres import PostgresMissing, find_postgres

ROOT = Path(__file__).resolve().parents[2]


def _pg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voxfit.search._postgres", *args],
        cwd=ROOT, text=True, capture_output=True, timeout=180, check=False,
    )  # fmt: skip


def test_make_postgres_starts_reuses_and_stops_a_server(tmp_path: Path) -> None:
    try:
        find_postgres()
    except PostgresMissing as e:
        pytest.skip(str(e))
    if os.geteuid() == 0:
        # the server runs as the postgres user, who cannot enter pytest's private tmp
        r = _pg("start", str(tmp_path / "pg"))
        assert r.returncode == 2
        assert "cannot enter" in r.stderr
        assert "postgres" in r.stderr
    root = Path(tempfile.mkdtemp(prefix="voxfit-pg-test-"))
    try:
        first = _pg("start", str(root))
        assert first.returncode == 0, first.stderr
        (url,) = [x.removeprefix("STORAGE=") for x in first.stdout.splitlines() if "STORAGE=" in x]
        assert url.startswith("postgresql+psycopg://voxfit:")
        assert "@127.0.0.1:" in url
        assert oct((root / "password").stat().st_mode)[-3:] == "600"
        again = _pg("start", str(root))  # already running: the same server, the same URL
        assert again.returncode == 0, again.stderr
        assert f"STORAGE={url}" in again.stdout
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as c:
            assert c.execute("SELECT current_database()").fetchone() == ("voxfit",)
        stop = _pg("stop", str(root))
        assert stop.returncode == 0, stop.stderr
        assert "stopped" in stop.stdout
    finally:
        if (root / "data" / "postmaster.pid").exists():
            _pg("stop", str(root))
        shutil.rmtree(root, ignore_errors=True)
