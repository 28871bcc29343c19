"""A bounded lease of a device from a TVM RPC tracker (plain Python: no TVM import here;
the tracker object comes from the caller)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def lease_bounded(
    tracker: Any,
    host: str,
    port: int,
    key: str,
    *,
    priority: int,
    session_timeout_s: float,
    wait_s: float,
) -> Any:
    """A session on a device with ``key`` from a TVM RPC tracker, waiting at most ``wait_s``
    for a free one (TVM's own request waits forever while the tracker keeps it queued).

    ``tracker``: a connected tracker, or a callable returning one (then the connection is
    made inside the bounded wait too).

    Raises:
        TimeoutError: no device was leased within ``wait_s`` (one line naming tracker and key).
    """

    def lease() -> Any:
        t = tracker() if callable(tracker) else tracker
        return t.request(key, priority=priority, session_timeout=session_timeout_s)

    return call_bounded(
        lease,
        wait_s,
        f"RPC tracker {host}:{port}: no free device with key {key!r} within {wait_s:g} s",
    )


def call_bounded(fn: Callable[[], Any], timeout_s: float, timed_out: str) -> Any:
    """``fn()`` in a daemon thread, given up after ``timeout_s`` (a blocked socket call of
    TVM's RPC cannot be interrupted; the abandoned thread stays blocked). Whatever ``fn``
    raises is re-raised here.

    Raises:
        TimeoutError: ``fn`` did not return within ``timeout_s`` (message ``timed_out``).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = fn()
        except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise TimeoutError(timed_out)
    if "error" in box:
        raise box["error"]
    return box["out"]
