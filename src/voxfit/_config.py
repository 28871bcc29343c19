"""Strict reading of user-edited YAML into typed values, with errors that name file and key.

Hardware profiles and search spaces are YAML files users edit by hand. :class:`Fields`
walks one mapping: every read names its key, nested mappings keep the dotted path, and
:meth:`Fields.done` rejects keys nobody read, so a typo ``latency_budget_sm`` is an error
(naming the file and ``latency_budget_sm``) instead of a silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

from voxfit.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()


def load_yaml_mapping(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Read ``path`` as a YAML mapping.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or is not a mapping.
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}:{where} invalid YAML: {problem}") from e
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
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {_type_name(kind)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(name, f"expected {_type_name(kind)}, got {value!r}")
        return value

    def number(
        self,
        name: str,
        kind: type[T],
        default: Any = _MISSING,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
    ) -> T:
        """Like :meth:`get` for an int/float with bounds ``lo <= v <= hi`` (``lo < v`` if open)."""
        v: Any = self.get(name, kind, default)
        if v is None:
            return v  # type: ignore[return-value]
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise self.error(name, f"must be {'>' if lo_open else '>='} {lo:g}, got {v!r}")
        if hi is not None and v > hi:
            raise self.error(name, f"must be <= {hi:g}, got {v!r}")
        return v  # type: ignore[no-any-return]

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
        if not name or any(c in name for c in "/\\ "):
            raise self.error("name", f"{name!r} must be non-empty without spaces or slashes")
        return name

    def choice(self, name: str, options: tuple[str, ...], default: Any = _MISSING) -> str:
        """A string that must be one of ``options``."""
        v = self.get(name, str, default)
        if v not in options:
            raise self.error(name, f"{v!r} is not one of {', '.join(options)}")
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
            raise self.error(name, f"expected a mapping, got {value!r}")
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
            raise self.error(name, f"expected a list, got {value!r}")
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
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            raise self.error(unknown[0], f"unknown key (known here: {known})")
