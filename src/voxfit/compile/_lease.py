"""A bounded lease of a device from a TVM RPC tracker (plain Python: no TVM import here;
the tracker object comes from the caller)."""

from __future__ import annotations

import threading
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
    box: dict[str, Any] = {}

    def lease() -> None:
        try:
            t = tracker() if callable(tracker) else tracker
            box["session"] = t.request(key, priority=priority, session_timeout=session_timeout_s)
        except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    th = threading.Thread(target=lease, daemon=True)
    th.start()
    th.join(wait_s)
    if th.is_alive():
        raise TimeoutError(
            f"RPC tracker {host}:{port}: no free device with key {key!r} within {wait_s:g} s"
        )
    if "error" in box:
        raise box["error"]
    return box["session"]
