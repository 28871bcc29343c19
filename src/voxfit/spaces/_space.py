"""Search spaces: what a search may choose, per layer, as a YAML file under ``spaces/``.

A space names the model family it is for and, by the model's declared names (glob patterns
allowed, e.g. ``blocks.*.hidden``), which channel groups may be pruned and to which keep
ratios, which weight/activation bit-widths each quantizable layer may take, where adapters
may go and how big, and the recovery (distillation) budgets. Every pattern must match at
least one declared name of the model: a typo fails fast with the file and key.

:func:`sample` turns a space into a :class:`~voxfit.plan.Candidate` through any object with
``suggest_categorical(name, choices)`` -- an Optuna trial, or a seeded fake in tests.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from voxfit._config import (
    ADAPTER_DIM,
    RECOVERY_STEPS,
    Bound,
    Fields,
    check_float,
    check_int,
    load_yaml_mapping,
    show,
)
from voxfit.errors import ConfigError
from voxfit.plan import (
    ACT_BITS,
    ADAPTER_KINDS,
    WEIGHT_BITS,
    AdapterPlan,
    Candidate,
    GroupPlan,
    LayerPlan,
)
from voxfit.structure import FAMILIES, ModelStructure, is_factory

SPACE_SCHEMA_VERSION = 1
_KINDS = ADAPTER_KINDS
_IMPORTANCE = ("magnitude", "adaptation")
_KEEP_RATIO = Bound(0.0, 1.0, lo_open=True)


class Suggester(Protocol):
    """What :func:`sample` needs: Optuna's ``Trial`` has it."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class Rule:
    """Choices for every declared name matching ``pattern`` (``key`` locates it in the file)."""

    pattern: str
    choices: tuple[Any, ...]
    key: str


@dataclass(frozen=True)
class SearchSpace:
    """A parsed space file; names are checked against a model by :meth:`bind`."""

    name: str
    model: str
    groups: tuple[Rule, ...]
    weight_bits: tuple[Rule, ...]
    act_bits: tuple[Rule, ...]
    adapter_slots: tuple[Rule, ...]
    adapter_kinds: tuple[str, ...] = ("residual",)
    importance: tuple[str, ...] = ("magnitude",)
    recovery_steps: tuple[int, ...] = (0,)
    description: str = ""
    source: str = field(default="space", compare=False)
    # one activation bit-width for every layer that offers a choice of them (``abits:*``;
    # a layer with one choice keeps it), and at 8 bits only quantized weights (int8 compute
    # pays only in unbroken int8 chains)
    shared_act_bits: bool = False
    # with shared_act_bits: the weight bit-widths a layer draws from when the shared width
    # is 8 (``quantization.int8_weight_bits``; a layer without a rule: its quantized
    # weight_bits), for profiles where some of them do not pay at int8 compute
    int8_weight_bits: tuple[Rule, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        def rules(rs: tuple[Rule, ...]) -> dict[str, list[Any]]:
            return {r.pattern: list(r.choices) for r in rs}

        return {
            "schema_version": SPACE_SCHEMA_VERSION,
            "name": self.name,
            "model": self.model,
            "description": self.description,
            "pruning": {"importance": list(self.importance), "groups": rules(self.groups)},
            "recovery_steps": list(self.recovery_steps),
            "quantization": {
                "weight_bits": rules(self.weight_bits),
                "act_bits": rules(self.act_bits),
                # only when set: the spaces without it keep their hashes (and studies)
                **({"shared_act_bits": True} if self.shared_act_bits else {}),
                **(
                    {"int8_weight_bits": rules(self.int8_weight_bits)}
                    if self.int8_weight_bits
                    else {}
                ),
            },
            "adapters": {"kinds": list(self.adapter_kinds), "slots": rules(self.adapter_slots)},
        }

    def stable_hash(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def choices(self) -> dict[str, Any]:
        """What a search can draw from this space: :meth:`to_dict` without the prose."""
        out = self.to_dict()
        out.pop("description")
        return out

    def choices_hash(self) -> str:
        """Hash of :meth:`choices`: rewording the description leaves it unchanged."""
        text = json.dumps(self.choices(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def bind(self, structure: ModelStructure) -> BoundSpace:
        """Resolve the patterns against a model's declared names.

        Raises:
            ConfigError: a pattern that matches no declared name (naming file and key).
        """
        bound = BoundSpace(
            self,
            groups=_resolve(self.groups, [g.name for g in structure.groups], self.source),
            weight_bits=_resolve(self.weight_bits, structure.quantizable, self.source),
            act_bits=_resolve(self.act_bits, structure.quantizable, self.source),
            adapters=_resolve(
                self.adapter_slots, [s.name for s in structure.adapter_slots], self.source
            ),
            int8_weight_bits=_resolve(self.int8_weight_bits, structure.quantizable, self.source),
        )
        if self.shared_act_bits and not bound.shared_act_choices():
            raise ConfigError(
                f"{self.source}: quantization.shared_act_bits: the layers' act_bits have no "
                "choice in common (or no layer has a choice)"
            )
        for n, choices in bound.int8_weight_bits.items():
            offered = bound.weight_bits.get(n, (32,))
            if not set(choices) <= set(offered):
                raise ConfigError(
                    f"{self.source}: quantization.int8_weight_bits: {n} offers {list(choices)} "
                    f"at int8 compute, but its weight_bits are {list(offered)}"
                )
        return bound


@dataclass(frozen=True)
class BoundSpace:
    """A space resolved against one model: per declared name, its choices, in model order."""

    space: SearchSpace
    groups: dict[str, tuple[Any, ...]]
    weight_bits: dict[str, tuple[Any, ...]]
    act_bits: dict[str, tuple[Any, ...]]
    adapters: dict[str, tuple[Any, ...]]
    int8_weight_bits: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def shared_act_choices(self) -> tuple[int, ...]:
        """With ``shared_act_bits``: the activation bit-widths every layer with a choice of
        them offers (in the first such layer's order; layers with one choice keep it); empty
        when they share none, or no layer has a choice."""
        tables = [t for t in self.act_bits.values() if len(t) > 1]
        if not tables:
            return ()
        return tuple(a for a in tables[0] if all(a in t for t in tables[1:]))

    def n_choices(self) -> int:
        """How many distinct parameter settings the space has (a rough size)."""
        n = 1
        for table in (self.groups, self.weight_bits, self.act_bits, self.adapters):
            for c in table.values():
                n *= len(c)
        for c in (self.space.adapter_kinds, self.space.importance, self.space.recovery_steps):
            n *= len(c)
        return n


def _resolve(
    rules: Iterable[Rule], names: Sequence[str], source: str
) -> dict[str, tuple[Any, ...]]:
    """Later rules override earlier ones for the names they match."""
    out: dict[str, tuple[Any, ...]] = {}
    for r in rules:
        hit = [n for n in names if fnmatch.fnmatchcase(n, r.pattern)]
        if not hit:
            raise ConfigError(
                f"{source}: {r.key}: {r.pattern!r} matches no declared name "
                f"(the model declares: {', '.join(names)})"
            )
        for n in hit:
            out[n] = r.choices
    return {n: out[n] for n in names if n in out}


def _rules(f: Fields | None, check: Any, what: str) -> tuple[Rule, ...]:
    if f is None:
        return ()
    out = []
    for pattern, raw in f.entries():
        values = raw if isinstance(raw, list) else [raw]
        if not values:
            raise f.error(pattern, f"needs at least one {what}")
        for v in values:
            problem = check(v)
            if problem:
                raise f.error(pattern, f"{show(v)} {problem}")
        if len(set(values)) != len(values):
            raise f.error(pattern, f"repeated choice in {show(values)}")
        out.append(Rule(pattern, tuple(values), f.key(pattern)))
    return tuple(out)


def _ratio(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "is not a number"
    return None if check_float(v, _KEEP_RATIO) is None else "must be in (0, 1]"


def _in(options: tuple[int, ...]) -> Any:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or v not in options:
            return f"is not one of {', '.join(map(str, options))}"
        return None

    return check


def _dim(v: Any) -> str | None:
    if check_int(v, ADAPTER_DIM) is not None:
        return f"must be an adapter size in 0..{ADAPTER_DIM.hi:g} (0 = no adapter)"
    return None


def _str_list(
    f: Fields, name: str, options: tuple[str, ...], default: list[str]
) -> tuple[str, ...]:
    raw = f.get(name, (list, str), default)
    values = raw if isinstance(raw, list) else [raw]
    for v in values:
        if v not in options:
            raise f.error(name, f"{show(v)} is not one of {', '.join(options)}")
    if not values:
        raise f.error(name, "needs at least one choice")
    return tuple(values)


def space_from_dict(raw: dict[str, Any], source: str = "space") -> SearchSpace:
    """Parse a space mapping (see ``spaces/tdnn-default.yaml``).

    Raises:
        ConfigError: naming ``source`` and the dotted key of the first problem.
    """
    f = Fields(raw, source)
    name = f.header(SPACE_SCHEMA_VERSION)
    model = f.get("model", str)
    if model not in FAMILIES and not is_factory(model):
        raise f.error(
            "model",
            f"{show(model)} is not one of {', '.join(FAMILIES)} or a factory "
            "(package.module:function)",
        )
    description = f.get("description", str, "")
    pruning = f.sub_optional("pruning")
    groups: tuple[Rule, ...] = ()
    importance: tuple[str, ...] = ("magnitude",)
    if pruning is not None:
        importance = _str_list(pruning, "importance", _IMPORTANCE, ["magnitude"])
        groups = _rules(pruning.sub_optional("groups"), _ratio, "keep ratio")
        pruning.done()
    steps_raw = f.get("recovery_steps", (list, int), [0])
    steps = steps_raw if isinstance(steps_raw, list) else [steps_raw]
    for s in steps:
        problem = check_int(s, RECOVERY_STEPS)
        if problem:
            raise f.error("recovery_steps", problem)
    quant = f.sub_optional("quantization")
    wbits: tuple[Rule, ...] = ()
    abits: tuple[Rule, ...] = ()
    shared = False
    int8_wbits: tuple[Rule, ...] = ()
    if quant is not None:
        wbits = _rules(quant.sub_optional("weight_bits"), _in(WEIGHT_BITS), "bit-width")
        abits = _rules(quant.sub_optional("act_bits"), _in(ACT_BITS), "bit-width")
        shared = quant.get("shared_act_bits", bool, False)
        int8_wbits = _rules(
            quant.sub_optional("int8_weight_bits"),
            _in(tuple(b for b in WEIGHT_BITS if b < 32)),
            "bit-width",
        )
        if int8_wbits and not shared:
            raise quant.error(
                "int8_weight_bits", "needs shared_act_bits: true (it applies at 8-bit activations)"
            )
        quant.done()
    adapters = f.sub_optional("adapters")
    slots: tuple[Rule, ...] = ()
    kinds: tuple[str, ...] = ("residual",)
    if adapters is not None:
        kinds = _str_list(adapters, "kinds", _KINDS, ["residual"])
        slots = _rules(adapters.sub_optional("slots"), _dim, "adapter size")
        adapters.done()
    f.done()
    return SearchSpace(
        name=name,
        model=model,
        groups=groups,
        weight_bits=wbits,
        act_bits=abits,
        adapter_slots=slots,
        adapter_kinds=kinds,
        importance=importance,
        recovery_steps=tuple(steps),
        description=description,
        source=source,
        shared_act_bits=bool(shared),
        int8_weight_bits=int8_wbits,
    )


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file (names are checked later, by :meth:`SearchSpace.bind`)."""
    p, raw = load_yaml_mapping(path)
    return space_from_dict(raw, str(p))


# The shipped spaces are package data (``spaces/`` at the repository root links here), so an
# installed voxfit finds them from any folder.
SHIPPED_SPACES = Path(__file__).resolve().parent / "shipped"


def find_space(name_or_path: str, spaces_dir: str | Path | None = None) -> SearchSpace:
    """A space by file path, or by name under ``spaces_dir`` (default: the shipped spaces,
    :data:`SHIPPED_SPACES`)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_space(p)
    spaces_dir = SHIPPED_SPACES if spaces_dir is None else Path(spaces_dir)
    candidate = spaces_dir / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(x.stem for x in spaces_dir.glob("*.yaml"))
        raise ConfigError(
            f"no space {name_or_path!r} in {spaces_dir} (have: {', '.join(known) or 'none'})"
        )
    return load_space(candidate)


_LayerParams = tuple[str, tuple[str, tuple[Any, ...]], tuple[str | None, tuple[Any, ...]]]


def _layer_params(space: BoundSpace, shared: int | None) -> list[_LayerParams]:
    """Per quantizable layer: its weight parameter (name, choices) and activation parameter
    (name, choices; name None where the shared ``abits:*`` = ``shared`` decides). A layer at
    a shared activation width below 32 draws its weights from its quantized choices only
    (at 8: its ``int8_weight_bits`` where the space has a rule for it), under another name
    (``wbits@a<bits>:<layer>``: Optuna keeps one choice list per name)."""
    out: list[_LayerParams] = []
    for n in dict.fromkeys([*space.weight_bits, *space.act_bits]):
        wchoices = space.weight_bits.get(n, (32,))
        achoices = space.act_bits.get(n, (32,))
        wname = f"wbits:{n}"
        if shared is not None and len(achoices) > 1:
            quantized = tuple(w for w in wchoices if w < 32)
            if shared == 8 and n in space.int8_weight_bits:
                quantized = space.int8_weight_bits[n]
            if shared < 32 and quantized and quantized != wchoices:
                wname, wchoices = f"wbits@a{shared}:{n}", quantized
            out.append((n, (wname, wchoices), (None, achoices)))
        else:
            out.append((n, (wname, wchoices), (f"abits:{n}", achoices)))
    return out


def sample(space: BoundSpace, suggester: Suggester) -> Candidate:
    """One candidate, every choice made through ``suggester.suggest_categorical``.

    Parameter names: ``keep:<group>``, ``wbits:<layer>``, ``abits:<layer>``,
    ``adapter:<slot>`` (0 = none), ``adapter_kind``, ``importance``, ``recovery_steps``.
    A name with a single choice is still suggested, so every trial records its full plan.
    """
    groups = tuple(
        GroupPlan(n, float(suggester.suggest_categorical(f"keep:{n}", list(c))))
        for n, c in space.groups.items()
    )
    layers = []
    shared = (
        int(suggester.suggest_categorical("abits:*", list(space.shared_act_choices())))
        if space.space.shared_act_bits
        else None
    )
    for n, (wname, wchoices), (aname, achoices) in _layer_params(space, shared):
        w = int(suggester.suggest_categorical(wname, list(wchoices)))
        a = shared if aname is None else int(suggester.suggest_categorical(aname, list(achoices)))
        assert a is not None
        if w < 32 or a < 32:
            layers.append(LayerPlan(n, w, a))
    dims = {
        n: int(suggester.suggest_categorical(f"adapter:{n}", list(c)))
        for n, c in space.adapters.items()
    }
    kind = str(suggester.suggest_categorical("adapter_kind", list(space.space.adapter_kinds)))
    adapters = tuple(AdapterPlan(n, d, kind) for n, d in dims.items() if d > 0)  # type: ignore[arg-type]
    importance = str(suggester.suggest_categorical("importance", list(space.space.importance)))
    steps = int(suggester.suggest_categorical("recovery_steps", list(space.space.recovery_steps)))
    pruned = any(g.keep_ratio < 1.0 for g in groups)
    return Candidate(
        groups=tuple(g for g in groups if g.keep_ratio < 1.0),
        layers=tuple(layers),
        adapters=adapters,
        importance=importance if pruned else "magnitude",  # type: ignore[arg-type]
        recovery_steps=steps if pruned else 0,
    )


def params_of(space: BoundSpace, candidate: Candidate) -> dict[str, Any]:
    """The suggester answers that make :func:`sample` return ``candidate`` (for enqueueing).

    Raises:
        ConfigError: the candidate uses a value the space does not offer.
    """
    out: dict[str, Any] = {}
    for n in space.groups:
        out[f"keep:{n}"] = candidate.keep_ratio(n)
    tables: dict[str, Sequence[Any]] = {}
    shared: int | None = None
    if space.space.shared_act_bits:
        acts = {candidate.layer(n).act_bits for n, c in space.act_bits.items() if len(c) > 1}
        if len(acts) != 1:
            raise ConfigError(
                f"{space.space.source}: the plan's activation bit-widths {sorted(acts)} are "
                "not one shared choice (quantization.shared_act_bits)"
            )
        shared = out["abits:*"] = acts.pop()
        tables["abits:*"] = space.shared_act_choices()
    for n, (wname, wchoices), (aname, achoices) in _layer_params(space, shared):
        lp = candidate.layer(n)
        out[wname] = lp.weight_bits
        tables[wname] = wchoices
        if aname is not None:
            out[aname] = lp.act_bits
            tables[aname] = achoices
    dims = candidate.adapter_dims()
    kinds = set(candidate.adapter_kinds().values())
    for n in space.adapters:
        out[f"adapter:{n}"] = dims.get(n, 0)
    out["adapter_kind"] = kinds.pop() if kinds else space.space.adapter_kinds[0]
    out["importance"] = candidate.importance if candidate.groups else space.space.importance[0]
    out["recovery_steps"] = (
        candidate.recovery_steps if candidate.groups else space.space.recovery_steps[0]
    )
    tables |= {
        **{f"keep:{n}": c for n, c in space.groups.items()},
        **{f"adapter:{n}": c for n, c in space.adapters.items()},
        "adapter_kind": space.space.adapter_kinds,
        "importance": space.space.importance,
        "recovery_steps": space.space.recovery_steps,
    }
    for k, v in out.items():
        if v not in tables[k]:
            raise ConfigError(
                f"{space.space.source}: the plan's {k} = {v!r} is not offered "
                f"(choices: {list(tables[k])})"
            )
    return out
