"""A tamper-evident log of what a study did with users' voice data.

Each study has one append-only JSON-lines file, ``<work>/audit/<study>.jsonl``. Every line
is one event::

    {"seq": 3, "time": "2026-12-03T11:46:02.120+00:00", "event": "trial_completed",
     "data": {...}, "prev_hash": "<hash of seq 2>", "hash": "<sha256 of this line's rest>"}

``hash`` is the sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of the other
five fields, and ``prev_hash`` is the previous line's ``hash`` (64 zeros for seq 1), so an
edited, deleted, inserted or reordered line breaks the chain at that line:
:func:`verify_log` names the first broken link. Rewriting every hash after an edit is
possible for whoever holds the file; what anchors the chain is its head, signed into each
bundle's ``manifest.sig`` at export (``voxfit export --sign-key``): a log whose entry at the
signed seq no longer carries the signed hash was rewritten (``voxfit audit verify --bundle``).

Events: ``study_created`` / ``search_started`` (a resumed study; with the voxfit version,
the storage, the held-out speakers and the ids of the adaptation and evaluation utterances
the accuracy proxy adapts to and scores), ``trial_completed`` / ``trial_failed`` (trial,
plan hash, which speakers' adaptation sets it used) and ``bundle_exported`` (trial, plan
hash, the bundle's manifest sha256, the signing key's fingerprint, the voxfit version).

Why a file under the work folder and not the study's Optuna storage: Optuna's study user
attributes are a key -> value table that any client may overwrite; an append there is a
read-modify-write that two workers can interleave (a lost event), and a chain needs exactly
one successor per entry. A file opened with ``O_APPEND`` and extended under an exclusive
``fcntl`` lock (read the last line, write the next, ``fsync``, unlock) gives that order
between any number of processes on one machine, can be made append-only by the system
(``chattr +a``) and shipped or checked without the database. Its limit: ``flock`` does not
span machines, so workers on several hosts each need their own log (named per host) or a
table with a unique ``seq`` in the shared database; that is for the multi-host workers to do.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import importlib.metadata as md
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxfit.errors import ConfigError, VoxfitError

AUDIT_DIR = "audit"
GENESIS = "0" * 64
FIELDS = ("seq", "time", "event", "data", "prev_hash", "hash")
EVENTS = (
    "study_created",
    "search_started",
    "trial_completed",
    "trial_failed",
    "bundle_exported",
)
_TAIL_BLOCK = 64 * 1024


def canonical(value: Any) -> bytes:
    """The bytes an entry's hash is taken over: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of every field but ``hash``."""
    return hashlib.sha256(canonical({k: entry[k] for k in FIELDS if k != "hash"})).hexdigest()


def audit_path(work: str | Path, study: str) -> Path:
    """``<work>/audit/<study>.jsonl``; a study name with characters other than letters,
    digits, ``.``, ``_`` and ``-`` gets them replaced and a short hash of the real name."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", study).lstrip(".") or "_"
    if safe != study:
        safe += "-" + hashlib.sha256(study.encode()).hexdigest()[:8]
    return Path(work) / AUDIT_DIR / f"{safe}.jsonl"


def voxfit_version() -> str:
    try:
        return md.version("voxfit")
    except md.PackageNotFoundError:
        return "unknown"


def redact_url(url: str) -> str:
    """A storage URL without its password (``postgresql://u:***@host/db``)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


@dataclass(frozen=True, slots=True)
class AuditCheck:
    """What :func:`verify_log` found: ``entries`` valid lines before the first broken one,
    ``head`` the last valid hash (None: no valid entry), ``problem`` one line naming the
    first broken link (None: the whole chain holds)."""

    path: Path
    entries: int
    head: str | None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


class AuditLog:
    """One study's hash-chained log (see the module docstring). Safe for concurrent
    appenders on one machine; an append that cannot be written raises (never skipped)."""

    def __init__(self, path: str | Path, study: str) -> None:
        self.path = Path(path)
        self.study = study

    @classmethod
    def of_study(cls, work: str | Path, study: str) -> AuditLog:
        return cls(audit_path(work, study), study)

    def append(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Append one event after the current last entry; returns the written entry.

        Raises:
            VoxfitError: ``event`` is not one of :data:`EVENTS`, ``data`` is not JSON, the
                file cannot be written, or its last line is not a valid entry (the chain is
                not extended past damage: run ``voxfit audit verify``).
        """
        if event not in EVENTS:
            raise VoxfitError(f"audit: unknown event {event!r} (one of {', '.join(EVENTS)})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise VoxfitError(f"{self.path}: cannot open the audit log ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_line(fd)
            if last is None:
                seq, prev = 1, GENESIS
            else:
                try:
                    tail = json.loads(last)
                    seq, prev = int(tail["seq"]) + 1, str(tail["hash"])
                except (ValueError, KeyError, TypeError) as e:
                    raise VoxfitError(
                        f"{self.path}: the last line is not an audit entry ({type(e).__name__})"
                        "; not appending past it (check with: voxfit audit verify)"
                    ) from None
            entry: dict[str, Any] = {
                "seq": seq,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "event": event,
                "data": dict(data),
                "prev_hash": prev,
            }
            try:
                entry["hash"] = entry_hash(entry)
            except (TypeError, ValueError) as e:
                raise VoxfitError(f"audit: event {event} has data that is not JSON: {e}") from e
            line = json.dumps({k: entry[k] for k in FIELDS}, ensure_ascii=False) + "\n"
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
            return entry
        except OSError as e:
            raise VoxfitError(f"{self.path}: cannot append ({e.strerror})") from None
        finally:
            os.close(fd)  # closing releases the lock

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every line that parses as a JSON object, in file order (no chain check)."""
        for _, entry, _ in _lines(self.path):
            if isinstance(entry, dict):
                yield entry

    def verify(self) -> AuditCheck:
        return verify_log(self.path)

    # the events, one call each from the search and the export

    def search_started(self, study: Any, ctx: Any, storage: str) -> dict[str, Any]:
        """``study_created`` on an empty log, else ``search_started`` (a resume): the
        voxfit version, where the study lives, and the held-out data the proxy uses."""
        empty = not (self.path.is_file() and self.path.stat().st_size)
        fresh = empty and not any(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        attrs = study.user_attrs
        return self.append(
            "study_created" if fresh else "search_started",
            {
                "study": study.study_name,
                # a study older than its log: the log starts at this resume
                **({"log_starts_here": True} if empty and not fresh else {}),
                "storage": redact_url(storage),
                "voxfit": voxfit_version(),
                "profile": (attrs.get("profile") or {}).get("name"),
                "space": attrs.get("space"),
                "corpus_manifest": attrs.get("manifest"),
                "checkpoint": attrs.get("checkpoint"),
                "adaptation_data": ctx.adaptation_data(),
            },
        )

    def trial_finished(self, trial: Any, ctx: Any) -> dict[str, Any]:
        """``trial_completed`` / ``trial_failed``: the plan hash and whose adaptation sets
        the trial used (a failed trial may have used them before failing: listed too)."""
        from voxfit.search._record import record_of

        rec = record_of(trial)
        data = ctx.adaptation_data()
        used = sorted(rec.accuracy.per_speaker) if rec.accuracy.per_speaker else None
        failed = rec.failure is not None or trial.state.name == "FAIL"
        return self.append(
            "trial_failed" if failed else "trial_completed",
            {
                "trial": trial.number,
                "plan_hash": rec.plan_hash,
                "baseline": rec.baseline or None,
                "adaptation": rec.accuracy.adaptation or "proxy",
                "speakers": used if used is not None else sorted(data["speakers"]),
                "adaptation_sets_sha256": data["sha256"],
                **({"failure": rec.failure} if failed else {}),
            },
        )

    def bundle_exported(
        self, trial: int, plan_hash: str, bundle: str, manifest_sha256: str, signed_by: str | None
    ) -> dict[str, Any]:
        """``bundle_exported``: which trial, the bundle's name and its manifest's sha256."""
        return self.append(
            "bundle_exported",
            {
                "trial": trial,
                "plan_hash": plan_hash,
                "bundle": bundle,
                "manifest_sha256": manifest_sha256,
                "signed_by": signed_by,
                "voxfit": voxfit_version(),
            },
        )


def _last_line(fd: int) -> bytes | None:
    """The last non-empty line of the open file (None when it has none)."""
    end = os.lseek(fd, 0, os.SEEK_END)
    buf = b""
    pos = end
    while pos > 0:
        step = min(_TAIL_BLOCK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        lines = buf.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or pos == 0:
            last = lines[-1].strip()
            return last or None
    return None


def _lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed value or None, parse error or None) for each non-empty line."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no audit log (a search writes it)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield n, json.loads(raw.decode("utf-8")), None
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                yield n, None, type(e).__name__


def verify_log(path: str | Path) -> AuditCheck:
    """Recompute the chain; the first broken link is named by line and seq.

    A line is broken when it is not a JSON object with exactly the six fields, its ``seq``
    is not the previous one + 1 (a line deleted, inserted or moved), its ``prev_hash`` is not
    the previous line's hash, or its ``hash`` is not the sha256 of its content (edited).

    Raises:
        ConfigError: the log does not exist or cannot be read.
    """
    p = Path(path)
    prev, count = GENESIS, 0
    for n, entry, error in _lines(p):
        why = _link_problem(entry, error, count + 1, prev)
        if why is not None:
            where = f"line {n} (seq {count + 1} expected)"
            return AuditCheck(p, count, prev if count else None, f"{p}: {where}: {why}")
        prev, count = entry["hash"], count + 1
    return AuditCheck(p, count, prev if count else None)


def _link_problem(entry: Any, error: str | None, seq: int, prev: str) -> str | None:
    if error is not None:
        return f"not JSON ({error})"
    if not isinstance(entry, dict) or set(entry) != set(FIELDS):
        return f"not an audit entry (fields: {', '.join(FIELDS)})"
    if entry["seq"] != seq:
        return f"has seq {entry['seq']!r}: an entry was deleted, inserted or moved here"
    if entry["prev_hash"] != prev:
        return "prev_hash is not the previous entry's hash (an entry was replaced)"
    try:
        ok = entry_hash(entry) == entry["hash"]
    except (TypeError, ValueError):
        ok = False
    return None if ok else "hash does not match its content (the entry was edited)"


def check_head(path: str | Path, seq: int, head_hash: str) -> str | None:
    """Why the log does not contain entry ``seq`` with hash ``head_hash`` (a signed chain
    head from a bundle), or None when it does and the chain up to it holds."""
    p = Path(path)
    check = verify_log(p)
    if seq > check.entries:
        if check.problem:
            return check.problem
        return f"{p}: has {check.entries} entries, the signed head is seq {seq} (truncated)"
    at = next((e for e in AuditLog(p, "").entries() if e.get("seq") == seq), {})
    if at.get("hash") != head_hash:
        return f"{p}: seq {seq} does not carry the signed hash (the log was rewritten)"
    return None
