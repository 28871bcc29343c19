"""Compression plans: plain frozen data (stdlib only, cheap to import).

A :class:`Candidate` says, for one model, how much of each channel group to keep, the weight
and activation bit-widths of each quantizable layer, and the adapter size at each adapter
slot. Anything not named keeps its default (keep everything, 32 bits, no adapter).
Candidates hash stably, round-trip through plain dicts and YAML, and validate against a
model's declared names with one-line errors that name the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from voxfit._config import (
    ADAPTER_DIM,
    RECOVERY_STEPS,
    Bound,
    check_float,
    check_int,
    key_text,
    parse_yaml,
    read_user_text,
    show,
)
from voxfit.errors import ConfigError

__all__ = [
    "ADAPTER_KINDS",
    "ACT_BITS",
    "PLAN_SCHEMA_VERSION",
    "WEIGHT_BITS",
    "AdapterPlan",
    "Candidate",
    "GroupPlan",
    "LayerPlan",
]

PLAN_SCHEMA_VERSION = 1
WEIGHT_BITS = (4, 8, 16, 32)
ACT_BITS = (8, 16, 32)
Importance = Literal["magnitude", "adaptation"]
AdapterKind = Literal["residual", "lora", "merged_lora"]
ADAPTER_KINDS = ("residual", "lora", "merged_lora")
_KEEP_RATIO = Bound(0.0, 1.0, lo_open=True)


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """Keep ``keep_ratio`` (0 < r <= 1) of channel group ``name``'s channels."""

    name: str
    keep_ratio: float = 1.0


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """Bit-widths of one quantizable layer (weights per output channel, activations per tensor)."""

    name: str
    weight_bits: int = 32
    act_bits: int = 32


@dataclass(frozen=True, slots=True)
class AdapterPlan:
    """An adapter at slot ``slot``: ``dim`` = bottleneck (residual) or rank (lora,
    merged_lora: a LoRA folded into its layer's quantized weight); 0 = none."""

    slot: str
    dim: int = 0
    kind: AdapterKind = "residual"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One point of a search space: the per-layer compression plan of one model."""

    groups: tuple[GroupPlan, ...] = ()
    layers: tuple[LayerPlan, ...] = ()
    adapters: tuple[AdapterPlan, ...] = ()
    importance: Importance = "magnitude"
    recovery_steps: int = 0  # distillation steps from the base model after pruning
    schema_version: int = PLAN_SCHEMA_VERSION
    note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for g in self.groups:
            if check_float(g.keep_ratio, _KEEP_RATIO) is not None:
                raise ConfigError(
                    f"groups.{g.name}.keep_ratio: {show(g.keep_ratio)} not in (0, 1]"
                )
        for layer in self.layers:
            if isinstance(layer.weight_bits, bool) or layer.weight_bits not in WEIGHT_BITS:
                raise ConfigError(
                    f"layers.{layer.name}.weight_bits: {show(layer.weight_bits)} "
                    f"not in {WEIGHT_BITS}"
                )
            if isinstance(layer.act_bits, bool) or layer.act_bits not in ACT_BITS:
                raise ConfigError(
                    f"layers.{layer.name}.act_bits: {show(layer.act_bits)} not in {ACT_BITS}"
                )
        for a in self.adapters:
            if check_int(a.dim, ADAPTER_DIM) is not None:
                raise ConfigError(
                    f"adapters.{a.slot}.dim: {show(a.dim)} must be an integer in "
                    f"0..{ADAPTER_DIM.hi:g} (0 = no adapter)"
                )
            if a.kind not in ADAPTER_KINDS:
                raise ConfigError(
                    f"adapters.{a.slot}.kind: {show(a.kind)} not in ({', '.join(ADAPTER_KINDS)})"
                )
        if check_int(self.recovery_steps, RECOVERY_STEPS) is not None:
            raise ConfigError(
                f"recovery_steps: {show(self.recovery_steps)} must be an integer in "
                f"0..{RECOVERY_STEPS.hi:g}"
            )
        if self.importance not in ("magnitude", "adaptation"):
            raise ConfigError(
                f"importance: {show(self.importance)} not in (magnitude, adaptation)"
            )
        if isinstance(self.schema_version, bool) or self.schema_version != PLAN_SCHEMA_VERSION:
            raise ConfigError(
                f"schema_version: {show(self.schema_version)} "
                f"(this voxfit reads {PLAN_SCHEMA_VERSION})"
            )
        for what, names in (
            ("groups", [g.name for g in self.groups]),
            ("layers", [x.name for x in self.layers]),
            ("adapters", [a.slot for a in self.adapters]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"{what}: named more than once: {', '.join(dup)}")

    # -- lookups -------------------------------------------------------------------------
    def keep_ratio(self, group: str) -> float:
        """Keep ratio of ``group`` (1.0 when the plan does not name it)."""
        return next((g.keep_ratio for g in self.groups if g.name == group), 1.0)

    def layer(self, name: str) -> LayerPlan:
        """Bits of layer ``name`` (32/32 when the plan does not name it)."""
        return next((x for x in self.layers if x.name == name), LayerPlan(name))

    def adapter_dims(self) -> dict[str, int]:
        """Slot -> bottleneck (or rank) for every slot with an adapter."""
        return {a.slot: a.dim for a in self.adapters if a.dim > 0}

    def adapter_kinds(self) -> dict[str, AdapterKind]:
        """Slot -> adapter kind for every slot with an adapter."""
        return {a.slot: a.kind for a in self.adapters if a.dim > 0}

    def validate_names(
        self, groups: Iterable[str], layers: Iterable[str], slots: Iterable[str]
    ) -> None:
        """Check every name against a model's declaration.

        Raises:
            ConfigError: ``<field>.<name>: not a ... of this model``, listing a few valid names.
        """
        for what, used, known in (
            ("groups", [g.name for g in self.groups], set(groups)),
            ("layers", [x.name for x in self.layers], set(layers)),
            ("adapters", [a.slot for a in self.adapters], set(slots)),
        ):
            for name in used:
                if name not in known:
                    some = ", ".join(sorted(known)[:6])
                    raise ConfigError(
                        f"{what}.{name}: not a {what[:-1]} of this model (known: {some}, ...)"
                    )

    # -- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-ready dict; groups/layers/adapters as name -> settings maps."""
        return {
            "schema_version": self.schema_version,
            "importance": self.importance,
            "recovery_steps": self.recovery_steps,
            "groups": {g.name: {"keep_ratio": g.keep_ratio} for g in self.groups},
            "layers": {
                x.name: {"weight_bits": x.weight_bits, "act_bits": x.act_bits} for x in self.layers
            },
            "adapters": {a.slot: {"dim": a.dim, "kind": a.kind} for a in self.adapters},
            **({"note": self.note} if self.note else {}),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "plan") -> Candidate:
        """Inverse of :meth:`to_dict`; unknown keys are errors naming ``source`` and the key.

        Raises:
            ConfigError: unknown/missing keys or invalid values.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        top = {
            "schema_version",
            "importance",
            "recovery_steps",
            "groups",
            "layers",
            "adapters",
            "note",
        }
        unknown = sorted(str(k) for k in set(raw) - top)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(map(key_text, unknown))}")
        if "schema_version" not in raw:
            raise ConfigError(f"{source}: missing key schema_version")

        def entries(key: str, allowed: set[str]) -> list[tuple[str, dict[str, Any]]]:
            section = raw.get(key) or {}
            if not isinstance(section, Mapping):
                raise ConfigError(f"{source}: {key} must be a mapping of name -> settings")
            out = []
            for name, settings in section.items():
                if not isinstance(settings, Mapping):
                    raise ConfigError(f"{source}: {key}.{key_text(name)} must be a mapping")
                bad = sorted(str(k) for k in set(settings) - allowed)
                if bad:
                    raise ConfigError(
                        f"{source}: {key}.{key_text(name)}: "
                        f"unknown key(s) {', '.join(map(key_text, bad))}"
                    )
                out.append((str(name), dict(settings)))
            return out

        try:
            return cls(
                groups=tuple(GroupPlan(n, **s) for n, s in entries("groups", {"keep_ratio"})),
                layers=tuple(
                    LayerPlan(n, **s) for n, s in entries("layers", {"weight_bits", "act_bits"})
                ),
                adapters=tuple(
                    AdapterPlan(n, **s) for n, s in entries("adapters", {"dim", "kind"})
                ),
                importance=raw.get("importance", "magnitude"),
                recovery_steps=raw.get("recovery_steps", 0),
                schema_version=raw["schema_version"],
                note=str(raw.get("note", "")),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def stable_hash(self) -> str:
        """sha256 (16 hex) of the canonical plan: equal plans hash equal whatever their order.

        Entries that equal the defaults (keep 1.0, 32/32 bits, adapter 0) do not change it.
        """
        canon = {
            "v": self.schema_version,
            "importance": self.importance,
            "recovery_steps": self.recovery_steps,
            "groups": sorted(
                (g.name, float(g.keep_ratio)) for g in self.groups if g.keep_ratio != 1.0
            ),
            "layers": sorted(
                (x.name, x.weight_bits, x.act_bits)
                for x in self.layers
                if (x.weight_bits, x.act_bits) != (32, 32)
            ),
            "adapters": sorted((a.slot, a.dim, a.kind) for a in self.adapters if a.dim > 0),
        }
        return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()[:16]

    def dump_yaml(self) -> str:
        """YAML text of :meth:`to_dict` (pyyaml is imported only here)."""
        import yaml

        return str(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, text: str, source: str = "plan") -> Candidate:
        """Parse YAML written by :meth:`dump_yaml`.

        Raises:
            ConfigError: empty text, YAML errors (with line) or invalid content, one line
                naming ``source``.
        """
        if not text.strip():
            raise ConfigError(f"{source}: the plan is empty")
        return cls.from_dict(parse_yaml(text, source), source)

    @classmethod
    def load(cls, path: str | Path) -> Candidate:
        """Read a ``plan.yaml`` (a bundle's, or one a user wrote).

        Raises:
            ConfigError: missing, empty, binary, non-UTF-8 or oversized file, invalid YAML, or
                invalid content -- one line naming the file and the field.
        """
        p, text = read_user_text(path)
        return cls.load_yaml(text, str(p))


# The attribute ``voxfit.compress.apply`` stores a compressed model's Candidate under.
PLAN_ATTR = "voxfit_plan"


def plan_of(model: object) -> Candidate:
    """The Candidate a compressed model was made from (an empty plan for a base model)."""
    plan = getattr(model, PLAN_ATTR, None)
    return plan if isinstance(plan, Candidate) else Candidate()
