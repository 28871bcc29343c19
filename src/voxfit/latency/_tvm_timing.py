"""Timing compiled models with TVM (TVM side: runs inside the TVM worker process).

The worker ops ``measure_local`` (``time_evaluator`` on this machine, optionally in rounds
alternating with a reference model, and per-kernel times), ``run_local`` (one inference, for
checking outputs), ``tracker_summary``, ``measure_rpc`` and ``run_rpc`` (the same two on a
device leased from a TVM RPC tracker) live here; ``voxfit.compile``'s worker serves them
next to its ``build`` op, in the same process, so a local measurement can run the executable
a build just kept there. Every function takes and returns plain dicts (they cross a process
boundary).
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from voxfit.compile import call_bounded, kept_executable, lease_bounded

log = logging.getLogger(__name__)


def _cv(xs: list[float]) -> float | None:
    """Coefficient of variation, sample stdev / mean; None for fewer than two samples."""
    if len(xs) < 2:
        return None
    mean = statistics.fmean(xs)
    return statistics.stdev(xs) / mean if mean > 0 else None


def _stats(secs: list[float]) -> dict[str, Any]:
    ms_ = sorted(s * 1e3 for s in secs)
    q = statistics.quantiles(ms_, n=4) if len(ms_) >= 2 else [ms_[0]] * 3
    return {
        "median_ms": statistics.median(ms_),
        "mean_ms": statistics.fmean(ms_),
        "min_ms": ms_[0],
        "max_ms": ms_[-1],
        "iqr_ms": q[2] - q[0],
        "cv": _cv(ms_),
        "samples_ms": ms_,
    }


def _input(frames: int, dev: tvm.runtime.Device, n_mels: int = 80) -> tvm.runtime.Tensor:
    """The timing input: one utterance of ``frames`` log-mel frames (fixed values)."""
    return tvm.runtime.tensor(
        np.random.default_rng(0).standard_normal((1, frames, n_mels)).astype("float32"), dev
    )


def _time_vm(
    vm: relax.VirtualMachine,
    dev: tvm.runtime.Device,
    frames: int,
    m: dict[str, Any],
    n_mels: int = 80,
) -> dict[str, Any]:
    x = _input(frames, dev, n_mels)
    for _ in range(int(m["warmup"])):
        vm["main"](x)
    f = vm.time_evaluator(
        "main", dev, number=1, repeat=int(m["repeats"]), min_repeat_ms=int(m["min_repeat_ms"])
    )
    return _stats(list(f(x).results))


def _time_calls(
    vm: relax.VirtualMachine, dev: tvm.runtime.Device, frames: int, runs: int, n_mels: int = 80
) -> list:
    """Per-call wall time of the compiled kernels, in call order: [name, median ms] each.

    The VM's instrument hook brackets every call instruction; VM builtins (allocation,
    shape checks) are left out, so the kernels' sum is a little below a whole-model time.
    """
    x = tvm.runtime.tensor(np.zeros((1, frames, n_mels), dtype="float32"), dev)
    per_run: list[list[tuple[str, float]]] = []
    calls: list[tuple[str, float]] = []
    started = [0.0]

    def instrument(_func: object, symbol: str, before: bool, _ret: object, *_args: object) -> int:
        if before:
            started[0] = time.perf_counter()
        elif not symbol.startswith("vm.builtin."):
            calls.append((symbol, time.perf_counter() - started[0]))
        return 0

    vm.set_instrument(instrument)
    try:
        for _ in range(runs + 1):  # the first run warms caches and is dropped
            calls.clear()
            vm["main"](x)
            per_run.append(list(calls))
    finally:
        vm.set_instrument(None)
    per_run = per_run[1:]
    return [
        [name, statistics.median(r[i][1] for r in per_run) * 1e3]
        for i, (name, _) in enumerate(per_run[0])
    ]


# Reference executables stay loaded for the worker's life (measure_local's ``reference``).
_REFERENCES: dict[str, Any] = {}


def _vm_of(lib: str, dev: tvm.runtime.Device) -> relax.VirtualMachine:
    ex = kept_executable(lib)
    return relax.VirtualMachine(ex if ex is not None else tvm.runtime.load_module(lib), dev)


def _time_paired(
    vm: relax.VirtualMachine,
    ref: relax.VirtualMachine,
    dev: tvm.runtime.Device,
    frames: int,
    m: dict[str, Any],
    n_mels: int = 80,
) -> dict[str, Any]:
    """Time ``vm`` and a reference model in alternating rounds (one sample each per round).

    The machine's speed drifts (shared host: 1.5-2x over hours, bursts of load within
    seconds); the median of the per-round ratios cancels what both runs of a round share.
    ``relative_cv`` is the ratios' coefficient of variation (what drift leaves over).
    """
    x = _input(frames, dev, n_mels)
    for _ in range(int(m["warmup"])):
        vm["main"](x)
        ref["main"](x)
    kw = {"number": 1, "repeat": 1, "min_repeat_ms": int(m["min_repeat_ms"])}
    f, g = vm.time_evaluator("main", dev, **kw), ref.time_evaluator("main", dev, **kw)
    mine, theirs = [], []
    for _ in range(int(m["repeats"])):
        mine.append(f(x).results[0])
        theirs.append(g(x).results[0])
    out = _stats(mine)
    out["reference_ms"] = statistics.median(theirs) * 1e3
    ratios = sorted(a / b for a, b in zip(mine, theirs, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    out["relative"] = statistics.median(ratios)
    out["relative_iqr"] = q[2] - q[0]
    out["relative_cv"] = _cv(ratios)
    return out


def measure_local(req: dict[str, Any]) -> dict[str, Any]:
    """Time ``lib`` on this machine (request keys: lib, frames, measurement, device,
    ``calls``: how many instrumented runs give per-kernel times, 0 for none, and
    ``reference``: a library timed in rounds alternating with ``lib``, 0/None for none)."""
    dev = tvm.cuda(0) if req.get("device") == "cuda" else tvm.cpu(0)
    vm = _vm_of(req["lib"], dev)
    n_mels = int(req.get("n_mels", 80))  # the model's input bins
    if req.get("reference"):
        if req["reference"] not in _REFERENCES:
            _REFERENCES[req["reference"]] = _vm_of(req["reference"], dev)
        ref = _REFERENCES[req["reference"]]
        out = _time_paired(vm, ref, dev, int(req["frames"]), req["measurement"], n_mels)
    else:
        out = _time_vm(vm, dev, int(req["frames"]), req["measurement"], n_mels)
    out["threads"] = int(os.environ.get("TVM_NUM_THREADS", "0"))
    if int(req.get("calls", 0)) > 0:
        out["calls"] = _time_calls(vm, dev, int(req["frames"]), int(req["calls"]), n_mels)
    return out


def run_local(req: dict[str, Any]) -> dict[str, Any]:
    """Run ``lib`` once on ``input`` (a numpy array) here; returns the output array."""
    dev = tvm.cuda(0) if req.get("device") == "cuda" else tvm.cpu(0)
    vm = _vm_of(req["lib"], dev)
    out = vm["main"](tvm.runtime.tensor(np.asarray(req["input"], dtype="float32"), dev))
    first = out[0] if not hasattr(out, "numpy") else out
    return {"output": first.numpy()}


def _check_tracker(host: str, port: int, key: str, timeout_s: float) -> None:
    """Fail in bounded time, in one line, when the tracker or the device key is missing."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConnectionError(
            f"RPC tracker {host}:{port} unreachable ({reason}) for device key {key!r} "
            f"after {timeout_s:g} s"
        ) from None


def tracker_summary(req: dict[str, Any]) -> dict[str, Any]:
    """A tracker's state (request keys: host, port; ``key`` names the key asked about in
    errors, ``*`` for any): ``keys`` (free servers per device key), ``queue`` (per key:
    free servers and pending requests) and ``servers`` (each registered server's key and
    address)."""
    from tvm import rpc

    _check_tracker(req["host"], int(req["port"]), req.get("key", "*"), 5.0)
    summary = rpc.connect_tracker(req["host"], int(req["port"])).summary()
    queue = {
        str(k): {"free": int(v.get("free", 0)), "pending": int(v.get("pending", 0))}
        for k, v in summary.get("queue_info", {}).items()
    }
    servers = []
    for info in summary.get("server_info", []):
        addr = info.get("addr")
        where = f"{addr[0]}:{addr[1]}" if isinstance(addr, list | tuple) and len(addr) == 2 else ""
        servers.append({"key": str(info.get("key", "")).removeprefix("server:"), "addr": where})
    return {"keys": {k: v["free"] for k, v in queue.items()}, "queue": queue, "servers": servers}


def _lease(r: dict[str, Any]) -> Any:
    """A session on a device leased from the tracker (request's ``rpc`` dict): the tracker
    and the key checked first (reaching the tracker bounded by connect_timeout_s), the wait
    in its queue for a free device bounded by queue_timeout_s (default: connect_timeout_s)."""
    from tvm import rpc

    host, port, key = r["tracker_host"], int(r["tracker_port"]), r["device_key"]
    _check_tracker(host, port, key, float(r["connect_timeout_s"]))
    tracker = rpc.connect_tracker(host, port)
    summary = tracker.summary()
    keys = set(summary.get("queue_info", {}))
    if key not in keys:
        raise ConnectionError(
            f"RPC tracker {host}:{port} has no device with key {key!r} "
            f"(registered: {', '.join(sorted(keys)) or 'none'})"
        )
    return lease_bounded(
        tracker,
        host,
        port,
        key,
        priority=1,
        session_timeout_s=float(r["session_timeout_s"]),
        wait_s=float(r.get("queue_timeout_s") or r["connect_timeout_s"]),
    )


def _remote_vm(
    remote: Any, req: dict[str, Any], key: str = "lib"
) -> tuple[Any, Any, relax.VirtualMachine]:
    """``req[key]`` uploaded to the leased device and loaded there: (module, device, VM).

    The remote file is named after ``key`` too: a candidate and its reference are both
    ``<input>.so``, and a second upload under the same name would replace the first.
    """
    lib = Path(req[key])
    remote.upload(str(lib), target=f"{key}-{lib.name}")
    rlib = remote.load_module(f"{key}-{lib.name}")
    dev = remote.cuda(0) if req.get("device") == "cuda" else remote.cpu(0)
    return rlib, dev, relax.VirtualMachine(rlib, dev)


def _within(run: Any, remote: Any, timeout_s: float) -> dict[str, Any]:
    """``run(remote)``, given up after ``timeout_s``: a device that dies can leave the
    session blocked on a socket instead of failing it (seen when a server is killed while a
    client connects or uploads). The abandoned call's thread stays blocked; it holds no
    live device."""
    out: dict[str, Any] = call_bounded(
        lambda: dict(run(remote)),
        timeout_s,
        f"the device did not answer within {timeout_s:g} s (measurement.rpc.run_timeout_s)",
    )
    return out


def _run_timeout_s(req: dict[str, Any]) -> float:
    """How long one attempt (upload, load, timing) may take: ``rpc.run_timeout_s`` when
    set, else 60 s for upload and load plus three times the timing's own minimum (each
    repeat lasts at least min_repeat_ms; twice that with a reference in the rounds), within
    the session's timeout."""
    r = req["rpc"]
    if r.get("run_timeout_s"):
        return float(r["run_timeout_s"])
    m = req.get("measurement") or {}
    timing_s = (int(m.get("warmup", 0)) + int(m.get("repeats", 1))) * max(
        float(m.get("min_repeat_ms", 0)), 100.0
    )
    if req.get("reference"):
        timing_s *= 2
    return min(60.0 + 3.0 * timing_s / 1e3, float(r.get("session_timeout_s", 300.0)))


def _on_a_device(req: dict[str, Any], run: Any) -> dict[str, Any]:
    """``run(remote)`` on a device leased from the tracker; when the device fails under it
    (a server killed or unplugged mid-measurement: an error, or no answer within
    :func:`_run_timeout_s`), lease again -- the tracker hands out another free server
    of the key, the lost one having left it -- up to ``rpc.attempts`` times in all
    (default 3). The result says how many attempts it took and what the failed ones said
    (``device_errors``).

    A lease that finds no free device within the queue timeout counts as a failed
    attempt too.

    Raises:
        ConnectionError: the tracker is unreachable or has no device with the key.
        RuntimeError: every attempt failed (each attempt's error, in order).
    """
    r = req["rpc"]
    attempts = max(1, int(r.get("attempts", 3)))
    timeout_s = _run_timeout_s(req)
    errors: list[str] = []
    for attempt in range(1, attempts + 1):
        t0 = time.monotonic()
        remote = None
        try:
            # a lease can hang too: the tracker may hand out a server that just died
            remote = _lease(r)
            out = _within(run, remote, timeout_s)
        except ConnectionError:
            raise  # no tracker, or no device with the key: another lease will not help
        except Exception as e:  # noqa: BLE001 - a device that went away raises many kinds
            first = str(e).strip().splitlines()
            errors.append(f"{type(e).__name__}: {first[-1] if first else ''}"[:300])
            log.debug("device attempt %d failed after %.1f s: %s", attempt,
                      time.monotonic() - t0, errors[-1])  # fmt: skip
            del remote
            if attempt < attempts:
                time.sleep(min(2.0 * attempt, 5.0))  # the tracker drops the lost server
            continue
        del remote  # frees the one-slot server for the next lease
        out["device_key"] = r["device_key"]
        out["attempts"] = attempt
        out["device_errors"] = errors
        return out
    raise RuntimeError(
        f"RPC device key {r['device_key']!r} at {r['tracker_host']}:{r['tracker_port']}: "
        f"{attempts} attempts failed: " + " | ".join(errors)
    )


def measure_rpc(req: dict[str, Any]) -> dict[str, Any]:
    """Upload ``lib`` to a device leased from the tracker and time it there (another
    device of the key when one fails mid-measurement, see :func:`_on_a_device`); with
    ``reference`` (a library), upload it too and time the two in alternating rounds on the
    same device (``reference_ms``, ``relative``, ``relative_iqr``, ``relative_cv``)."""

    def run(remote: Any) -> dict[str, Any]:
        rlib, dev, vm = _remote_vm(remote, req)
        if req.get("reference"):
            rref, _, ref = _remote_vm(remote, req, "reference")
            out = _time_paired(
                vm, ref, dev, int(req["frames"]), req["measurement"], int(req.get("n_mels", 80))
            )
            del ref, rref
        else:
            out = _time_vm(
                vm, dev, int(req["frames"]), req["measurement"], int(req.get("n_mels", 80))
            )
        del vm, rlib
        return out

    return _on_a_device(req, run)


def run_rpc(req: dict[str, Any]) -> dict[str, Any]:
    """Run ``lib`` once on ``input`` (a numpy array) on a leased device; returns the output
    array (the device's own result, for checking a device build against torch)."""

    def run(remote: Any) -> dict[str, Any]:
        rlib, dev, vm = _remote_vm(remote, req)
        # A remote call returns a handle to the remote tuple; the stateful interface fetches
        # its fields as tensors (TVM's way of running a VM over RPC).
        vm.set_input("main", tvm.runtime.tensor(np.asarray(req["input"], dtype="float32"), dev))
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        first = out[0] if isinstance(out, list | tuple) else out
        result = {"output": first.numpy()}
        del first, out, vm, rlib
        return result

    return _on_a_device(req, run)
