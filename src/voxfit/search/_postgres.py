"""A local PostgreSQL server for studies shared by many workers (``make postgres``, tests).

Debian's ``postgresql`` server, run from its own folder: ``initdb`` once, then ``pg_ctl``
start/stop. It listens on 127.0.0.1 only, with password (scram-sha-256) authentication for a
``voxfit`` role whose random password is kept in ``<root>/password`` (mode 0600); the Unix
socket sits in ``<root>`` too, so nothing system-wide is touched. PostgreSQL refuses to run
as root: as root, the server runs as the ``postgres`` system user (the Debian package makes
it), which must be able to reach ``<root>``.

The storage URL for Optuna is ``postgresql+psycopg://voxfit:<password>@127.0.0.1:<port>/voxfit``
(Psycopg 3; plain ``postgresql://`` URLs are read with it too, see :func:`sqlalchemy_url`).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from voxfit.errors import ConfigError

__all__ = [
    "PostgresMissing",
    "PostgresServer",
    "find_postgres",
    "local_postgres",
    "sqlalchemy_url",
    "start_postgres",
    "stop_postgres",
]

ROLE = "voxfit"
DATABASE = "voxfit"


class PostgresMissing(ConfigError):
    """The PostgreSQL server programs (initdb, pg_ctl, postgres) are not installed."""


@dataclass(frozen=True, slots=True)
class PostgresServer:
    """A running local server: its folder, port and the URL a study storage takes."""

    root: Path
    port: int
    url: str
    version: str

    @property
    def data(self) -> Path:
        return self.root / "data"


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` (SQLAlchemy's psycopg2 default, not installed) read with Psycopg 3;
    every other URL unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def find_postgres() -> Path:
    """The folder of the newest installed server's programs.

    Debian keeps them in ``/usr/lib/postgresql/<version>/bin`` (not on PATH); a PATH that
    has ``pg_ctl`` next to ``initdb`` and ``postgres`` wins.

    Raises:
        PostgresMissing: no server is installed (names what was looked for).
    """
    on_path = shutil.which("pg_ctl")
    if on_path:
        d = Path(on_path).resolve().parent
        if (d / "initdb").exists() and (d / "postgres").exists():
            return d

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name))

    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: version(p.parent)
    )
    if found:
        return found[-1].parent
    raise PostgresMissing(
        "PostgreSQL server not installed: no pg_ctl on PATH or in /usr/lib/postgresql/*/bin "
        "(Debian: apt-get install postgresql)"
    )


def _run_as() -> str | None:
    """The user the server runs as: None (this one) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigError(
            "PostgreSQL refuses to run as root and there is no 'postgres' user to run it as "
            "(the Debian postgresql package makes one)"
        ) from None
    return "postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg(bin_dir: Path, user: str | None, *args: str, log: Path | None = None) -> str:
    """Run one server program (as ``user``); its output, or ConfigError with its last lines."""
    r = subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        user=user,
        capture_output=True,
        text=True,
        check=False,
        cwd="/",  # the postgres user may not read the caller's folder
        timeout=120,
    )
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        if log is not None and log.exists():
            tail += log.read_text(errors="replace").strip().splitlines()[-3:]
        raise ConfigError(f"PostgreSQL {args[0]} failed: {' | '.join(tail)}")
    return r.stdout


def _reachable_by(user: str, path: Path) -> str | None:
    """Which folder above ``path`` ``user`` cannot enter (None: it can reach it)."""
    uid = pwd.getpwnam(user).pw_uid
    for d in [*reversed(path.resolve().parents)]:
        st = d.stat()
        if st.st_uid == uid:
            continue
        if not st.st_mode & 0o001:
            return str(d)
    return None


def _url(password: str, port: int) -> str:
    return f"postgresql+psycopg://{ROLE}:{password}@127.0.0.1:{port}/{DATABASE}"


def _version(url: str) -> str:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as c:
        row = c.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def _running_port(root: Path) -> int | None:
    """The port of the server running from ``root`` (its postmaster.pid), or None."""
    pid_file = root / "data" / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return port


def start_postgres(
    root: str | Path, port: int | None = None, *, fast: bool = False
) -> PostgresServer:
    """Start (initializing on first use) the server kept in ``root``; a server already
    running from ``root`` is reused.

    Args:
        root: the server's folder (data, log, password, socket).
        port: TCP port on 127.0.0.1 (None: a free one).
        fast: no fsync (tests: a crash may lose the database, which they throw away).

    Raises:
        PostgresMissing: the server programs are not installed.
        ConfigError: initdb or start failed (with the server's last log lines), or the
            server's user cannot reach ``root``.
    """
    bin_dir = find_postgres()
    user = _run_as()
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if user is not None:
        blocked = _reachable_by(user, root)
        if blocked:
            raise ConfigError(
                f"PostgreSQL runs as user {user}, who cannot enter {blocked} on the way to "
                f"{root}: pick a folder it can reach (e.g. under /tmp) or chmod o+x {blocked}"
            )
        shutil.chown(root, user, user)
    root.chmod(0o700)
    password_file = root / "password"
    data = root / "data"
    log = root / "postgres.log"
    if not (data / "PG_VERSION").exists():
        password = secrets.token_urlsafe(18)
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        if user is not None:
            shutil.chown(password_file, user, user)
        _pg(
            bin_dir, user, "initdb", "-D", str(data), "-U", ROLE, "-E", "UTF8",
            "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
            f"--pwfile={password_file}", "--no-instructions",
        )  # fmt: skip
    password = password_file.read_text().strip()
    running = _running_port(root)
    if running is None:
        port = port or _free_port()
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root}"
        if fast:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        _pg(bin_dir, user, "pg_ctl", "-D", str(data), "-l", str(log), "-o", opts, "-w",
            "-t", "60", "start", log=log)  # fmt: skip
        if user is not None:
            shutil.chown(log, user, user)
        running = port
    url = _url(password, running)
    _create_database(password, running)
    return PostgresServer(root, running, url, _version(url))


def _create_database(password: str, port: int) -> None:
    import psycopg

    admin = f"postgresql://{ROLE}:{password}@127.0.0.1:{port}/postgres"
    with psycopg.connect(admin, autocommit=True) as c:
        if c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
            return
        c.execute(f"CREATE DATABASE {DATABASE}")


def stop_postgres(root: str | Path, *, immediate: bool = False) -> bool:
    """Stop the server running from ``root``; False when none was running."""
    root = Path(root).resolve()
    if _running_port(root) is None:
        return False
    mode = "immediate" if immediate else "fast"
    _pg(find_postgres(), _run_as(), "pg_ctl", "-D", str(root / "data"), "-m", mode, "-w", "stop")
    return True


@contextmanager
def local_postgres(
    root: str | Path | None = None, *, fast: bool = True
) -> Iterator[PostgresServer]:
    """A server for the ``with`` block (tests, benchmarks), removed afterwards when
    ``root`` is None (a fresh folder under /tmp, which the ``postgres`` user can reach).

    Raises:
        PostgresMissing: the server programs are not installed.
    """
    find_postgres()
    import tempfile

    own = root is None
    folder = Path(tempfile.mkdtemp(prefix="voxfit-pg-")) if own else Path(str(root))
    try:
        server = start_postgres(folder, fast=fast)
        try:
            yield server
        finally:
            stop_postgres(folder, immediate=True)
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m voxfit.search._postgres start|stop|url ROOT [PORT]`` (``make postgres``)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in ("start", "stop"):
        print("usage: python -m voxfit.search._postgres start|stop ROOT [PORT]", file=sys.stderr)
        return 2
    try:
        if args[0] == "stop":
            print("stopped" if stop_postgres(args[1]) else f"no server running from {args[1]}")
            return 0
        s = start_postgres(args[1], int(args[2]) if len(args) > 2 else None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"PostgreSQL {s.version} running from {s.root} on 127.0.0.1:{s.port}")
    print(f"STORAGE={s.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
