"""An aarch64 device this machine can host: TVM's RPC server under ``qemu-aarch64``.

The device is Debian's qemu-user running an aarch64 CPython (Debian's arm64 packages,
unpacked into a private sysroot, nothing installed system-wide) with the aarch64 wheels of
the TVM this host runs. Libraries are cross-compiled here and uploaded over RPC like to a
board, so tuning and outputs are checked on real aarch64 code; timings under emulation are
not latency. Everything lives in one cache folder (default ``~/.cache/voxfit/qemu-aarch64``,
or ``$VOXFIT_QEMU_AARCH64``)::

    sysroot/   the arm64 .debs of python3.11 and libstdc++6, unpacked (dpkg -x)
    site/      aarch64 wheels: apache-tvm, apache-tvm-ffi, numpy, ... (pip --target)
    boot/      sitecustomize.py: ``sys.executable`` is bin/python3 (see below)
    bin/python3  a host shell script: ``exec qemu-aarch64 -L sysroot .../python3.11 "$@"``
    apt/       a private apt state (arm64 lists, downloaded .debs)

Without binfmt_misc the kernel cannot exec an aarch64 binary, and TVM's RPC server starts
its workers with ``sys.executable``; so the interpreter's ``sys.executable`` is the host
wrapper script, which qemu-user execs natively and which runs the next interpreter under
qemu again. The same holds for the compiler: MetaSchedule uploads object files that the
device links, and the device's ``CXX`` is the host's aarch64-linux-gnu-g++, run natively.
Each step leaves a stamp when it is complete: setup is idempotent and resumes.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from voxfit.errors import VoxfitError

__all__ = [
    "QemuEnv",
    "QemuSetupError",
    "default_qemu_dir",
    "qemu_rpc_server",
    "setup_qemu_aarch64",
    "start_qemu_rpc_server",
    "stop_server",
    "wait_registered",
]

log = logging.getLogger(__name__)

ENV_VAR = "VOXFIT_QEMU_AARCH64"
PYTHON_MINOR = "3.11"  # bookworm's python3; the host venv's too (cp311 wheels)
DEBS = (f"python{PYTHON_MINOR}", "libstdc++6")  # libstdc++ for libtvm.so
# what `python -m tvm.exec.rpc_server` imports, beyond the standard library
WHEELS = (
    "apache-tvm",
    "apache-tvm-ffi",
    "numpy",
    "ml_dtypes",
    "typing_extensions",
    "psutil",
    "cloudpickle",
    "tornado",
)
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_28_aarch64")
CROSS_CXX = "aarch64-linux-gnu-g++"
INSTALL_HINT = "make qemu-aarch64, or voxfit device qemu-server --setup"


class QemuSetupError(VoxfitError):
    """qemu-aarch64 or the aarch64 Python environment is missing or broken."""


@dataclass(frozen=True, slots=True)
class QemuEnv:
    """A complete aarch64 Python environment under qemu-user, rooted at ``root``."""

    root: Path
    qemu: str  # the qemu-aarch64 executable

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def python(self) -> Path:
        """The host-executable wrapper that runs the aarch64 interpreter under qemu."""
        return self.root / "bin" / "python3"

    def environ(self, threads: int = 1) -> dict[str, str]:
        """The environment of a process run with :attr:`python` (nothing of the host's
        Python leaks in: its PYTHONPATH and virtualenv would shadow the aarch64 wheels)."""
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        return {
            **keep,
            "PYTHONPATH": f"{self.root / 'boot'}:{self.site}",
            "PYTHONNOUSERSITE": "1",
            "VOXFIT_QEMU_PYTHON": str(self.python),
            "TVM_NUM_THREADS": str(threads),
            "TVM_BIND_THREADS": "0",
            # MetaSchedule uploads .tar artifacts that the device links: the "device's"
            # g++ is the host's cross g++ (qemu-user execs host programs natively)
            "CXX": CROSS_CXX,
        }


def default_qemu_dir() -> Path:
    """``$VOXFIT_QEMU_AARCH64``, else ``~/.cache/voxfit/qemu-aarch64``."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "voxfit" / "qemu-aarch64"


def _done(step: Path) -> bool:
    return (step / ".complete").is_file()


def _run(cmd: list[str], what: str, level: int = logging.INFO) -> None:
    log.log(level, "%s ...", what)
    log.debug("%s", " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QemuSetupError(f"{what} failed ({' '.join(cmd[:3])} ...): {tail[0]}")


def _qemu(install: bool) -> str:
    found = shutil.which("qemu-aarch64")
    if found:
        return found
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-user"], "apt")
        found = shutil.which("qemu-aarch64")
    if not found:
        raise QemuSetupError(
            "qemu-aarch64 not found: install Debian's qemu-user "
            f"(sudo apt-get install qemu-user, or {INSTALL_HINT})"
        )
    return found


def _sysroot(root: Path, install: bool) -> None:
    """The arm64 .debs of python3.11 and what it needs, from this host's apt sources, through
    a private apt state (arm64 only; the host's dpkg never sees them), unpacked."""
    dest = root / "sysroot"
    if _done(dest):
        return
    if not install:
        raise QemuSetupError(f"no aarch64 Python in {dest} (set it up: {INSTALL_HINT})")
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise QemuSetupError(
            f"the aarch64 Python sysroot comes from Debian's arm64 packages: apt-get and dpkg "
            f"are needed (Debian/Ubuntu host), or unpack python{PYTHON_MINOR}:arm64 into {dest}"
        )
    apt = root / "apt"
    for d in ("lists/partial", "archives/partial"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    opts = [
        "-q",
        "-o", "APT::Architecture=arm64",
        "-o", "APT::Architectures::=arm64",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::State::status={apt / 'status'}",
        "-o", f"Dir::Cache::archives={apt / 'archives'}",
        "-o", "Dir::Cache::pkgcache=",
        "-o", "Dir::Cache::srcpkgcache=",
        "-o", "Debug::NoLocking=1",
    ]  # fmt: skip
    _run(["apt-get", *opts, "update"], "apt-get update (arm64 lists)")
    _run(
        ["apt-get", *opts, "install", "-y", "--download-only", "--no-install-recommends", *DEBS],
        "apt-get download of the arm64 python",
    )
    tmp = root / "sysroot.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for deb in sorted((apt / "archives").glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(tmp)], "dpkg -x", logging.DEBUG)
    if not (tmp / "usr" / "bin" / f"python{PYTHON_MINOR}").is_file():
        raise QemuSetupError(f"the arm64 packages in {apt / 'archives'} hold no python3.11")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    (dest / ".complete").write_text("\n".join(DEBS) + "\n")
    (root / ".verified").unlink(missing_ok=True)


def _pins() -> list[str]:
    """The wheels, at this host's versions where the host has them (the device runs the TVM
    the host compiles with)."""
    out = []
    for name in WHEELS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def _site(root: Path, install: bool) -> None:
    dest = root / "site"
    if _done(dest):
        return
    if not install:
        raise QemuSetupError(f"no aarch64 TVM wheels in {dest} (set them up: {INSTALL_HINT})")
    tmp = root / "site.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    plat = [x for p in PLATFORMS for x in ("--platform", p)]
    pins = _pins()
    _run(
        [
            sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
            "--target", str(tmp), "--no-deps", "--only-binary=:all:", *plat,
            "--python-version", PYTHON_MINOR, "--implementation", "cp", *pins,
        ],
        "pip install of the aarch64 wheels",
    )  # fmt: skip
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    (dest / ".complete").write_text("\n".join(pins) + "\n")
    (root / ".verified").unlink(missing_ok=True)


def _launchers(env: QemuEnv) -> None:
    """bin/python3 and boot/sitecustomize.py, rewritten every time (paths may move)."""
    env.python.parent.mkdir(parents=True, exist_ok=True)
    interp = env.sysroot / "usr" / "bin" / f"python{PYTHON_MINOR}"
    script = f'#!/bin/sh\nexec "{env.qemu}" -L "{env.sysroot}" "{interp}" "$@"\n'
    if not env.python.is_file() or env.python.read_text() != script:
        env.python.write_text(script)
        env.python.chmod(0o755)
    boot = env.root / "boot"
    boot.mkdir(exist_ok=True)
    (boot / "sitecustomize.py").write_text(
        "# voxfit: children of this interpreter (TVM's RPC workers) run under qemu too\n"
        "import os, sys\n"
        "sys.executable = os.environ.get('VOXFIT_QEMU_PYTHON', sys.executable)\n"
    )


def _verify(env: QemuEnv) -> None:
    """Import TVM's RPC server under qemu once (~15 s); a stamp records the success."""
    stamp = env.root / ".verified"
    if stamp.is_file():
        return
    probe = "import platform, tvm, tvm.rpc.server; print(platform.machine(), tvm.__version__)"
    r = subprocess.run(
        [str(env.python), "-c", probe], capture_output=True, text=True, env=env.environ()
    )
    got = r.stdout.split()
    if r.returncode != 0 or not got or got[0] != "aarch64":
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QemuSetupError(f"{env.python} cannot import TVM's RPC server: {tail[0]}")
    stamp.write_text(" ".join(got) + "\n")


def setup_qemu_aarch64(cache_dir: str | Path | None = None, *, install: bool = True) -> QemuEnv:
    """Check, and with ``install`` make, the aarch64 Python environment under qemu-user.

    Needs the host's aarch64 cross g++ (``make sysdeps``). Installs what is missing:
    Debian's qemu-user (through apt-get, as root only), the
    arm64 python3.11 sysroot (a private apt state, downloads only), the aarch64 wheels
    (pip --target). Each step is stamped when complete, so a second call only checks and an
    interrupted one resumes. ``install=False`` only checks (what tests do).

    Args:
        cache_dir: the environment's folder (default: :func:`default_qemu_dir`).
        install: install what is missing instead of reporting it.

    Raises:
        QemuSetupError: something is missing (``install=False``) or an install step failed;
            one line naming what and how to install it.
    """
    root = Path(cache_dir) if cache_dir is not None else default_qemu_dir()
    qemu = _qemu(install)
    if not shutil.which(CROSS_CXX):
        raise QemuSetupError(
            f"{CROSS_CXX} not found: the emulated device links its libraries with it "
            "(sudo apt-get install g++-aarch64-linux-gnu, or make sysdeps)"
        )
    if install:
        root.mkdir(parents=True, exist_ok=True)
    _sysroot(root, install)
    _site(root, install)
    env = QemuEnv(root=root.resolve(), qemu=qemu)
    _launchers(env)
    _verify(env)
    return env


def start_qemu_rpc_server(
    env: QemuEnv,
    tracker_host: str,
    tracker_port: int,
    key: str,
    *,
    host: str = "127.0.0.1",
    port: int = 9090,
    port_end: int = 9199,
    threads: int = 1,
    log_file: str | Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python -m tvm.exec.rpc_server`` under qemu-aarch64, registered with the
    tracker under ``key``; it listens on the first free port in ``[port, port_end)``.

    The server is the leader of its own process group (its workers are in it too): stop it
    with :func:`stop_server`. Output goes to ``log_file`` (default: discarded). Registration
    takes ~15-30 s: the emulated interpreter imports TVM first.
    """
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            [
                str(env.python), "-m", "tvm.exec.rpc_server",
                "--host", host, "--port", str(port), "--port-end", str(port_end),
                "--tracker", f"{tracker_host}:{tracker_port}", "--key", key,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env.environ(threads),
            start_new_session=True,
        )  # fmt: skip
    finally:
        if log_file:
            out.close()  # type: ignore[union-attr]


def stop_server(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a clean exit


def wait_registered(
    proc: subprocess.Popen[bytes],
    tracker_host: str,
    tracker_port: int,
    key: str,
    timeout_s: float = 180.0,
) -> None:
    """Block until the tracker lists a free device under ``key``.

    Raises:
        QemuSetupError: the server exited, or did not register within ``timeout_s``.
    """
    from voxfit.compile import TvmWorker

    deadline = time.monotonic() + timeout_s
    with TvmWorker(1) as w:
        while True:
            r = w.call("tracker_summary", timeout_s=30, host=tracker_host, port=tracker_port)
            if "error" not in r and r.get("keys", {}).get(key, 0) >= 1:
                return
            where = f"tracker {tracker_host}:{tracker_port}, key {key!r}"
            if proc.poll() is not None:
                raise QemuSetupError(
                    f"the qemu-aarch64 RPC server exited with {proc.returncode} ({where})"
                )
            if time.monotonic() > deadline:
                why = f": {r['error']}" if "error" in r else ""
                raise QemuSetupError(
                    f"the qemu-aarch64 RPC server did not register within {timeout_s:g} s "
                    f"({where}){why}"
                )
            time.sleep(1.0)


@contextmanager
def qemu_rpc_server(
    env: QemuEnv,
    tracker_host: str,
    tracker_port: int,
    key: str,
    *,
    ready_timeout_s: float = 180.0,
    **kwargs: object,
) -> Iterator[subprocess.Popen[bytes]]:
    """:func:`start_qemu_rpc_server`, registered with the tracker before the body runs and
    stopped after it (``kwargs`` go to it)."""
    proc = start_qemu_rpc_server(env, tracker_host, tracker_port, key, **kwargs)  # type: ignore[arg-type]
    try:
        wait_registered(proc, tracker_host, tracker_port, key, ready_timeout_s)
        yield proc
    finally:
        stop_server(proc)


def main(argv: list[str] | None = None) -> int:
    """``python -m voxfit.latency._qemu [DIR]``: set the environment up (``make
    qemu-aarch64``); prints where it is, or the one-line reason it is not."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.monotonic()
    try:
        env = setup_qemu_aarch64(args[0] if args else None)
    except QemuSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verified = (env.root / ".verified").read_text().strip()
    took_s = time.monotonic() - t0
    print(f"aarch64 python under {env.qemu}: {env.python} ({verified}; {took_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
