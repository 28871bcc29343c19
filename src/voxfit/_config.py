"""Strict reading of user-edited YAML into typed values, with errors that name file and key.

Hardware profiles and search spaces are YAML files users edit by hand. :class:`Fields`
walks one mapping: every read names its key, nested mappings keep the dotted path, and
:meth:`Fields.done` rejects keys nobody read, so a typo ``latency_budget_sm`` is an error
(naming the file and ``latency_budget_sm``) instead of a silently ignored setting.

Every file a user hands voxfit goes through :func:`read_user_text` first (empty, binary,
non-UTF-8 and oversized files fail there, naming the file), and every count or budget is read
against a :class:`Bound` defined below, in one place, so NaN, inf and absurd values (``1e300``,
``10**12``) fail at load time with the file and key instead of much later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from voxfit.errors import ConfigError, VoxfitError

T = TypeVar("T")
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Bound:
    """The allowed range of a number read from a user file: ``lo <= v <= hi``
    (``lo < v`` when ``lo_open``)."""

    lo: float
    hi: float
    lo_open: bool = False

    def problem(self, value: float) -> str | None:
        """Why ``value`` is outside the range (None when inside); NaN and inf never fit."""
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if value <= self.lo if self.lo_open else value < self.lo:
            return f"must be {'>' if self.lo_open else '>='} {self.lo:g}, got {value!r}"
        if value > self.hi:
            return f"must be <= {self.hi:g}, got {value!r}"
        return None


# Every bound on a count or a budget read from a user file, in one place. Each upper bound is
# far above any real setting and low enough that a slip (``1e300``, ``10**12``, ``.inf``)
# fails at load time naming the file and key, not later as an overflow, a hang or an
# allocation that never returns.
CORES = Bound(1, 4096)
FRAMES = Bound(8, 1_000_000)  # 10 ms frames: up to 2.8 h in one input
TRIALS = Bound(0, 1_000_000)  # MetaSchedule trials per task
TRIALS_PER_ITER = Bound(1, 100_000)
WARMUP = Bound(0, 100_000)
REPEATS = Bound(1, 100_000)
REPEAT_MS = Bound(0, 3_600_000)  # min_repeat_ms: up to an hour
LATENCY_MS = Bound(0, 3_600_000, lo_open=True)  # a latency budget of an hour at most
MEMORY_MB = Bound(0, 16 * 1024 * 1024, lo_open=True)  # 16 TiB
TIMEOUT_S = Bound(0, 7 * 24 * 3600, lo_open=True)  # a week
PORT = Bound(1, 65535)
CHANNEL_MULTIPLE = Bound(1, 4096)
GFLOPS = Bound(0, 1e7, lo_open=True)  # 10 PFLOP/s
BANDWIDTH_GBS = Bound(0, 1e6, lo_open=True)  # 1 PB/s
RECOVERY_STEPS = Bound(0, 1_000_000)
ADAPTER_DIM = Bound(0, 1024)  # 0 = no adapter
UTTERANCE_S = Bound(0, 3600, lo_open=True)  # one manifest row: up to an hour of audio
# A search's trial count this large means "until its timeout": the most a service job may
# ask for, and what it runs when it names no count; its progress counts against no total.
OPEN_ENDED_TRIALS = 100_000
# A YAML config is a few KB; a bigger file given as one is almost surely the wrong file (a
# checkpoint, a dataset), so it is refused before being read into memory.
MAX_CONFIG_BYTES = 1024 * 1024
# A corpus manifest is ~200 bytes per utterance: 512 MiB is over two million utterances.
MAX_MANIFEST_BYTES = 512 * 1024 * 1024


def check_int(value: Any, bound: Bound) -> str | None:
    """Why ``value`` is not an int in ``bound`` (None when it is); bools are not ints."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected an integer, got {show(value)}"
    if abs(value) > 2**63:  # float(value) below would overflow for huge ints
        return f"must be <= {bound.hi:g}, got an integer of {len(str(abs(value)))} digits"
    return bound.problem(value)


def check_float(value: Any, bound: Bound) -> str | None:
    """Why ``value`` is not a finite number in ``bound`` (None when it is)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number, got {show(value)}"
    if isinstance(value, int) and abs(value) > 2**63:
        return f"must be <= {bound.hi:g}, got an integer of {len(str(abs(value)))} digits"
    return bound.problem(value)


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_text(key: Any) -> str:
    """A mapping key as an error names it: as written when short and printable, else
    :func:`show`'s quoted, cut form."""
    text = str(key)
    return text if text.isprintable() and len(text) <= 60 else show(text)


def read_user_text(
    path: str | Path,
    *,
    max_bytes: int | None = MAX_CONFIG_BYTES,
    error: type[VoxfitError] = ConfigError,
) -> tuple[Path, str]:
    """The text of a file a user gave us, checked to be non-empty UTF-8 text.

    Args:
        path: the file.
        max_bytes: refuse bigger files without reading them (None = no limit).
        error: the exception class to raise (ConfigError for configs, DataError for data).

    Raises:
        error: missing or unreadable, too big, empty, binary (NUL bytes), or not UTF-8 --
            one line naming the file (and the line of the first bad byte).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if p.is_dir():
            raise error(f"{p}: is a folder, not a file")
        if max_bytes is not None and size > max_bytes:
            raise error(
                f"{p}: {size / 1024:.0f} KiB is too large for this file "
                f"(limit {max_bytes // 1024} KiB); is it the right file?"
            )
        data = p.read_bytes()
    except OSError as e:
        raise error(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None
    if not data.strip():
        raise error(f"{p}: the file is empty")
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise error(f"{p}:{line}: a binary file (NUL byte), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(
            f"{p}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); is this the right file?"
        ) from None
    return p, text


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, every failure a one-line :class:`ConfigError` naming
    ``source`` and the line where pyyaml knows it (syntax, a document cut off mid-way, a date
    like 2001-02-30, nesting too deep).
    """
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
        raise ConfigError(
            f"{source}{where}: invalid YAML: {' '.join(str(problem).split())}"
        ) from None
    except (ValueError, RecursionError) as e:  # a constructor rejected a scalar, or depth
        raise ConfigError(f"{source}: invalid YAML: {' '.join(str(e).split())}") from None


def load_yaml_mapping(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Read ``path`` as a YAML mapping.

    Raises:
        ConfigError: the file is missing, empty, binary, not UTF-8, too large, not valid
            YAML, or not a mapping -- one line naming the file.
    """
    p, text = read_user_text(path)
    raw = parse_yaml(text, str(p))
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
    return p, raw


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return t.__name__


class Fields:
    """Typed, tracked access to one YAML mapping (``source`` names the file in errors)."""

    def __init__(self, data: Mapping[str, Any], source: str, prefix: str = "") -> None:
        self._data = data
        self._source = source
        self._prefix = prefix
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        """The dotted path of ``name`` (for messages)."""
        return f"{self._prefix}{name}"

    def error(self, name: str, message: str) -> ConfigError:
        """A :class:`ConfigError` naming the file and this mapping's key ``name``."""
        return ConfigError(f"{self._source}: {self.key(name)}: {message}")

    @overload
    def get(self, name: str, kind: type[T]) -> T: ...
    @overload
    def get(self, name: str, kind: type[T], default: T) -> T: ...
    @overload
    def get(self, name: str, kind: tuple[type, ...], default: Any = ...) -> Any: ...

    def get(self, name: str, kind: Any, default: Any = _MISSING) -> Any:
        """The value of ``name``, checked to be of ``kind`` (ints are accepted as floats).

        Raises:
            ConfigError: missing (and no default) or of the wrong type.
        """
        self._read.add(name)
        if name not in self._data or self._data[name] is None:
            if default is _MISSING:
                raise self.error(name, "is required")
            return default
        value = self._data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > 2**63:
                raise self.error(name, f"an integer of {len(str(abs(value)))} digits is absurd")
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {_type_name(kind)}, got {show(value)}")
        if not isinstance(value, kinds):
            raise self.error(name, f"expected {_type_name(kind)}, got {show(value)}")
        return value

    @overload
    def int_in(self, name: str, bound: Bound) -> int: ...
    @overload
    def int_in(self, name: str, bound: Bound, default: int) -> int: ...

    def int_in(self, name: str, bound: Bound, default: Any = _MISSING) -> int:
        """An integer in ``bound`` (see the bounds at the top of this module).

        Raises:
            ConfigError: missing (and no default), not an integer, or out of range.
        """
        v = self.get(name, int, default)
        problem = check_int(v, bound)
        if problem:
            raise self.error(name, problem)
        return int(v)

    @overload
    def float_in(self, name: str, bound: Bound) -> float: ...
    @overload
    def float_in(self, name: str, bound: Bound, default: float) -> float: ...
    @overload
    def float_in(self, name: str, bound: Bound, default: None) -> float | None: ...

    def float_in(self, name: str, bound: Bound, default: Any = _MISSING) -> float | None:
        """A finite number in ``bound`` (ints accepted; ``default`` may be None).

        Raises:
            ConfigError: missing (and no default), not a number, NaN/inf, or out of range.
        """
        v = self.get(name, float, default)
        if v is None:
            return None
        problem = check_float(v, bound)
        if problem:
            raise self.error(name, problem)
        return float(v)

    def header(self, schema_version: int) -> str:
        """Check ``schema_version`` equals the one this voxfit reads; return the ``name``
        (non-empty, no spaces or slashes: it names files and studies)."""
        version = self.get("schema_version", int)
        if version != schema_version:
            raise self.error(
                "schema_version",
                f"{version} is not supported (this voxfit reads {schema_version})",
            )
        name = self.get("name", str)
        if not name or not name.isprintable() or any(c in name for c in "/\\ "):
            raise self.error("name", f"{show(name)} must be non-empty without spaces or slashes")
        return name

    def choice(self, name: str, options: tuple[str, ...], default: Any = _MISSING) -> str:
        """A string that must be one of ``options``."""
        v = self.get(name, str, default)
        if v not in options:
            raise self.error(name, f"{show(v)} is not one of {', '.join(options)}")
        return v

    def sub(self, name: str) -> Fields:
        """The nested mapping ``name`` (required)."""
        found = self.sub_optional(name)
        if found is None:
            raise self.error(name, "is required")
        return found

    def sub_optional(self, name: str) -> Fields | None:
        """The nested mapping ``name``, or None when absent."""
        self._read.add(name)
        value = self._data.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(name, f"expected a mapping, got {show(value)}")
        return Fields(value, self._source, f"{self.key(name)}.")

    def items(self, name: str, *, default: list[Any] | None = None) -> list[Fields]:
        """The list of mappings ``name``, each readable as :class:`Fields`."""
        self._read.add(name)
        value = self._data.get(name)
        if value is None:
            if default is None:
                raise self.error(name, "is required")
            return [
                Fields(v, self._source, f"{self.key(name)}[{i}].") for i, v in enumerate(default)
            ]
        if not isinstance(value, list):
            raise self.error(name, f"expected a list, got {show(value)}")
        out = []
        for i, v in enumerate(value):
            if not isinstance(v, dict):
                raise ConfigError(f"{self._source}: {self.key(name)}[{i}]: expected a mapping")
            out.append(Fields(v, self._source, f"{self.key(name)}[{i}]."))
        return out

    def entries(self) -> list[tuple[str, Any]]:
        """Every (key, value) of an open-keyed mapping (a table of patterns), all marked read."""
        self._read.update(self._data)
        return [(str(k), v) for k, v in self._data.items()]

    def done(self) -> None:
        """Reject keys that were never read (typos, settings this version does not know).

        Raises:
            ConfigError: naming the first unknown key.
        """
        # str(): a YAML key may be a number or null, and mixed types do not sort
        unknown = sorted(str(k) for k in set(self._data) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            key = key_text(unknown[0])
            raise self.error(key, f"unknown key (known here: {known})")
