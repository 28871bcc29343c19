"""Hardware profiles: one target device, as a YAML file under ``hw_profiles/``.

A profile says what to compile for (a TVM target as a JSON dict), how to measure there
(locally, over a TVM RPC tracker, or predicted by the profile's cost model), the budgets a
deployable candidate must meet, the inputs to time, how much MetaSchedule tuning each new
layer shape gets, and the channel multiple pruning rounds to. Loading imports neither torch
nor TVM (it must be instant); :func:`explain` renders a profile for ``voxfit profile check``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from voxfit._config import (
    BANDWIDTH_GBS,
    CHANNEL_MULTIPLE,
    CORES,
    FRAMES,
    GFLOPS,
    LATENCY_MS,
    MEMORY_MB,
    PORT,
    REPEAT_MS,
    REPEATS,
    TIMEOUT_S,
    TRIALS,
    TRIALS_PER_ITER,
    WARMUP,
    Bound,
    Fields,
    check_int,
    load_yaml_mapping,
    show,
)
from voxfit.errors import ConfigError

PROFILE_SCHEMA_VERSION = 1
Method = Literal["local", "rpc", "predicted"]
METHODS: tuple[Method, ...] = ("local", "rpc", "predicted")
# Target kinds this project compiles for; TVM knows more, but these are the ones tested.
TARGET_KINDS = ("llvm", "cuda", "c")
# Bounds of the measurement-trust settings. They belong with the others in voxfit._config;
# they are here until that module's owner moves them (kept in one place all the same).
MAX_CV = Bound(0, 1, lo_open=True)  # a coefficient of variation, stdev / mean
MAX_REPEATS = Bound(0, 10)  # extra timing tries of a noisy measurement
ATTEMPTS = Bound(1, 10)  # device leases per measurement


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One input to time: ``frames`` log-mel frames (10 ms hop) for batch 1."""

    name: str
    frames: int


@dataclass(frozen=True, slots=True)
class RpcSpec:
    """Where the device farm's TVM RPC tracker listens, which device key to request, and
    how long each step of a measurement there may take.

    ``connect_timeout_s`` bounds reaching the tracker; ``queue_timeout_s`` the wait in its
    queue for a free device of the key (None: ``connect_timeout_s``, what older profiles
    meant); ``run_timeout_s`` one attempt's upload, load and timing (None: 60 s plus three
    times the timing's own minimum, within ``session_timeout_s``). A device that fails or
    does not answer costs another lease, up to ``attempts`` leases in all.
    """

    tracker_host: str
    tracker_port: int
    device_key: str
    connect_timeout_s: float = 20.0
    session_timeout_s: float = 300.0
    queue_timeout_s: float | None = None
    run_timeout_s: float | None = None
    attempts: int = 3

    @property
    def queue_wait_s(self) -> float:
        """How long a lease waits in the tracker's queue for a free device."""
        return self.connect_timeout_s if self.queue_timeout_s is None else self.queue_timeout_s


@dataclass(frozen=True, slots=True)
class MeasurementSpec:
    """How latency is measured (``time_evaluator`` settings; ms in the names are ms).

    A timing whose coefficient of variation (stdev / mean of its samples; of the per-round
    ratios when paired with a reference) exceeds ``max_cv`` is timed again, up to
    ``max_repeats`` more times; the steadiest try is kept, flagged noisy when still above.
    """

    method: Method = "local"
    warmup: int = 3
    repeats: int = 10
    min_repeat_ms: float = 100.0
    rpc: RpcSpec | None = None
    max_cv: float = 0.10
    max_repeats: int = 2


@dataclass(frozen=True, slots=True)
class TuningSpec:
    """MetaSchedule budget: ``trials_per_task`` for every task not yet in the database."""

    trials_per_task: int = 64
    trials_per_iter: int = 16
    builder_timeout_s: float = 300.0
    runner_timeout_s: float = 60.0
    database_dir: str | None = None  # default: cost_models/<name>/tuning
    # another profile of the same ISA family whose tuned schedules serve this one's tasks
    # until they are tuned on this device (a fallback layer, never preferred over its own)
    seed_from: str | None = None


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """A target device (see the module docstring); build with :func:`load_profile`."""

    name: str
    target: dict[str, Any]
    cores: int
    latency_budget_ms: float
    memory_budget_mb: float
    inputs: tuple[InputSpec, ...]
    measurement: MeasurementSpec
    tuning: TuningSpec
    channel_multiple: int
    description: str = ""
    host_target: dict[str, Any] | None = None
    cross_compiler: str | None = None
    peak_gflops: float | None = None
    memory_bandwidth_gbs: float | None = None
    source: str = field(default="", compare=False)
    schema_version: int = PROFILE_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-able), without the source path."""
        d = asdict(self)
        d.pop("source")
        d["inputs"] = [asdict(x) for x in self.inputs]
        return d

    def stable_hash(self) -> str:
        """12 hex digits over everything that changes compiled code or measurements."""
        d = self.to_dict()
        for k in ("description", "latency_budget_ms", "memory_budget_mb"):
            d.pop(k)
        if d["tuning"].get("seed_from") is None:  # hashes from before the field stay valid
            d["tuning"].pop("seed_from", None)
        # the same for the measurement-trust settings: left out while at their defaults
        _drop_defaults(d["measurement"], _MEASUREMENT_DEFAULTS)
        if d["measurement"].get("rpc") is not None:
            _drop_defaults(d["measurement"]["rpc"], _RPC_DEFAULTS)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def primary_input(self) -> InputSpec:
        """The input whose latency is the search objective (the first listed)."""
        return self.inputs[0]

    def database_dir(self, cost_models_dir: str | Path = "cost_models") -> Path:
        """Folder of this profile's persistent MetaSchedule tuning database."""
        if self.tuning.database_dir:
            p = Path(self.tuning.database_dir)
            return p if p.is_absolute() else Path(self.source).parent / p
        return Path(cost_models_dir) / self.name / "tuning"


# Fields added after profiles were hashed, at their defaults: left out of stable_hash.
_MEASUREMENT_DEFAULTS: dict[str, Any] = {"max_cv": 0.10, "max_repeats": 2}
_RPC_DEFAULTS: dict[str, Any] = {"queue_timeout_s": None, "run_timeout_s": None, "attempts": 3}


def _drop_defaults(d: dict[str, Any], defaults: dict[str, Any]) -> None:
    for k, v in defaults.items():
        if k in d and d[k] == v:
            del d[k]


def _target(f: Fields, key: str, *, required: bool) -> dict[str, Any] | None:
    raw = f.get(key, (dict, str)) if required else f.get(key, (dict, str), None)
    if raw is None:
        return None
    if isinstance(raw, str):
        raise f.error(
            key,
            f"{show(raw)} is a target string; TVM 0.27 wants a JSON dict, "
            "e.g. {kind: llvm, mtriple: x86_64-linux-gnu, mcpu: skylake-avx512}",
        )
    kind = raw.get("kind")
    if kind not in TARGET_KINDS:
        raise f.error(f"{key}.kind", f"{show(kind)} is not one of {', '.join(TARGET_KINDS)}")
    if raw.get("mcpu") == "native":
        raise f.error(f"{key}.mcpu", "'native' is rejected by TVM's default triple; name the CPU")
    for k, v in raw.items():
        if not isinstance(k, str):
            raise f.error(f"{key}", f"target keys must be strings, got {show(k)}")
        problem = _target_value_problem(v)
        if problem:
            raise f.error(f"{key}.{k}", problem)
    if "num-cores" in raw:
        problem = check_int(raw["num-cores"], CORES)
        if problem:
            raise f.error(f"{key}.num-cores", problem)
    return dict(raw)


def _target_value_problem(v: Any) -> str | None:
    """TVM target attributes are strings, booleans, integers or lists of strings; anything
    else (a YAML date, NaN, a nested mapping) would fail inside TVM or in the profile hash."""
    if isinstance(v, list):
        bad = next((x for x in v if not isinstance(x, str)), None)
        return None if bad is None else f"list items must be strings, got {show(bad)}"
    if isinstance(v, bool | str):
        return None
    if isinstance(v, int):
        return check_int(v, Bound(-(2**31), 2**31 - 1))
    return f"expected a string, integer, boolean or list of strings, got {show(v)}"


def _path_text(f: Fields, name: str) -> str | None:
    """An optional file name or command: one printable line (a YAML "\\0" escape in a path
    would only fail later, inside the OS call)."""
    v = f.get(name, str, None)
    if v is not None and (not v or not v.isprintable()):
        raise f.error(name, f"{show(v)} must be a non-empty printable path or command")
    return v


def profile_from_dict(raw: dict[str, Any], source: str = "profile") -> HardwareProfile:
    """Validate ``raw`` (a parsed profile YAML) into a :class:`HardwareProfile`.

    Raises:
        ConfigError: one line naming ``source`` and the offending key.
    """
    f = Fields(raw, source)
    name = f.header(PROFILE_SCHEMA_VERSION)
    target = _target(f, "target", required=True) or {}
    host = _target(f, "host_target", required=False)
    if target["kind"] == "cuda" and host is None:
        raise f.error("host_target", "a cuda target needs a host_target (an llvm target dict)")
    cores = f.int_in("cores", CORES)
    inputs = []
    for x in f.items("inputs"):
        inputs.append(InputSpec(x.get("name", str), x.int_in("frames", FRAMES)))
        x.done()
    if not inputs:
        raise f.error("inputs", "list at least one input to time")
    if len({x.name for x in inputs}) != len(inputs):
        raise f.error("inputs", "input names must be unique")

    m = f.sub("measurement")
    method = m.choice("method", METHODS)
    rpc = None
    r = m.sub("rpc") if method == "rpc" else m.sub_optional("rpc")
    if r is not None:
        rpc = RpcSpec(
            tracker_host=r.get("tracker_host", str),
            tracker_port=r.int_in("tracker_port", PORT),
            device_key=r.get("device_key", str),
            connect_timeout_s=r.float_in("connect_timeout_s", TIMEOUT_S, 20.0),
            session_timeout_s=r.float_in("session_timeout_s", TIMEOUT_S, 300.0),
            queue_timeout_s=r.float_in("queue_timeout_s", TIMEOUT_S, None),
            run_timeout_s=r.float_in("run_timeout_s", TIMEOUT_S, None),
            attempts=r.int_in("attempts", ATTEMPTS, 3),
        )
        if rpc.run_timeout_s is not None and rpc.run_timeout_s > rpc.session_timeout_s:
            raise r.error(
                "run_timeout_s",
                f"{rpc.run_timeout_s:g} s is longer than session_timeout_s "
                f"({rpc.session_timeout_s:g} s), which ends the device session first",
            )
        r.done()
    measurement = MeasurementSpec(
        method=method,  # type: ignore[arg-type]
        warmup=m.int_in("warmup", WARMUP, 3),
        repeats=m.int_in("repeats", REPEATS, 10),
        min_repeat_ms=m.float_in("min_repeat_ms", REPEAT_MS, 100.0),
        rpc=rpc,
        max_cv=m.float_in("max_cv", MAX_CV, 0.10),
        max_repeats=m.int_in("max_repeats", MAX_REPEATS, 2),
    )
    m.done()

    t = f.sub("tuning")
    tuning = TuningSpec(
        trials_per_task=t.int_in("trials_per_task", TRIALS),
        trials_per_iter=t.int_in("trials_per_iter", TRIALS_PER_ITER, 16),
        builder_timeout_s=t.float_in("builder_timeout_s", TIMEOUT_S, 300.0),
        runner_timeout_s=t.float_in("runner_timeout_s", TIMEOUT_S, 60.0),
        database_dir=_path_text(t, "database_dir"),
        seed_from=_path_text(t, "seed_from"),
    )
    t.done()
    if tuning.seed_from == name:
        raise t.error("seed_from", "names this profile itself; name another profile")

    profile = HardwareProfile(
        name=name,
        target=target,
        cores=cores,
        latency_budget_ms=f.float_in("latency_budget_ms", LATENCY_MS),
        memory_budget_mb=f.float_in("memory_budget_mb", MEMORY_MB),
        inputs=tuple(inputs),
        measurement=measurement,
        tuning=tuning,
        channel_multiple=f.int_in("channel_multiple", CHANNEL_MULTIPLE),
        description=f.get("description", str, ""),
        host_target=host,
        cross_compiler=_path_text(f, "cross_compiler"),
        peak_gflops=f.float_in("peak_gflops", GFLOPS, None),
        memory_bandwidth_gbs=f.float_in("memory_bandwidth_gbs", BANDWIDTH_GBS, None),
        source=source,
    )
    f.done()
    return profile


def load_profile(path: str | Path) -> HardwareProfile:
    """Load and validate a hardware profile YAML.

    Raises:
        ConfigError: unreadable/invalid YAML, an unknown key, or a bad value — one line
            naming the file and the key (e.g. ``measurement.rpc.tracker_port``).
    """
    p, raw = load_yaml_mapping(path)
    return profile_from_dict(raw, str(p))


# The shipped profiles are package data (``hw_profiles/`` at the repository root links here),
# so an installed voxfit finds them from any folder.
SHIPPED_PROFILES = Path(__file__).resolve().parent / "shipped"


def find_profile(name_or_path: str | Path, profiles_dir: str | Path | None = None) -> Path:
    """A profile file given its path or its name in ``profiles_dir`` (``<name>.yaml``;
    default: the shipped profiles, :data:`SHIPPED_PROFILES`).

    Raises:
        ConfigError: neither exists; lists the shipped profile names.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{p}: no such profile file")
        return p
    profiles_dir = SHIPPED_PROFILES if profiles_dir is None else Path(profiles_dir)
    cand = profiles_dir / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    names = sorted(x.stem for x in profiles_dir.glob("*.yaml"))
    raise ConfigError(
        f"unknown profile {str(name_or_path)!r} (in {profiles_dir}: {', '.join(names) or 'none'})"
    )


def explain(profile: HardwareProfile) -> list[tuple[str, str]]:
    """(setting, meaning) rows describing what the profile will make voxfit do."""
    m = profile.measurement
    if m.method == "local":
        how = f"on this machine with TVM time_evaluator, {m.warmup} warm-up runs"
    elif m.rpc is not None:
        r = m.rpc
        run = (
            f"{r.run_timeout_s:g} s"
            if r.run_timeout_s is not None
            else "60 s + 3x the timing's minimum"
        )
        how = (
            f"on a device with key {r.device_key!r} leased from the TVM RPC tracker at "
            f"{r.tracker_host}:{r.tracker_port} (reaching the tracker <= "
            f"{r.connect_timeout_s:g} s, waiting in its queue <= {r.queue_wait_s:g} s, "
            f"each attempt's upload and timing <= {run}; {r.attempts} attempts, another "
            "device of the key after a failure)"
        )
    else:
        how = "predicted by the profile's learned cost model (cost_models/<name>/)"
    rows = [
        ("name", f"{profile.name}  (hash {profile.stable_hash()})"),
        ("target", json.dumps(profile.target)),
        ("host_target", json.dumps(profile.host_target) if profile.host_target else "-"),
        ("threads", f"{profile.cores} (TVM_NUM_THREADS when measuring)"),
        (
            "budgets",
            f"latency <= {profile.latency_budget_ms:g} ms on "
            f"{profile.primary_input.name}, memory <= {profile.memory_budget_mb:g} MB",
        ),
        (
            "inputs",
            ", ".join(
                f"{x.name}: {x.frames} frames ({x.frames / 100:g} s)" for x in profile.inputs
            ),
        ),
        (
            "measurement",
            f"{m.method}: {how}; median of {m.repeats} repeats, each >= {m.min_repeat_ms:g} ms",
        ),
        (
            "measurement trust",
            f"a timing whose CV (stdev/mean; of the ratios when paired with a reference) "
            f"is above {m.max_cv:g} is timed again, up to {m.max_repeats} more times; the "
            "steadiest try is kept and flagged noisy when still above",
        ),
        (
            "tuning",
            f"{profile.tuning.trials_per_task} MetaSchedule trials per new task "
            f"({profile.tuning.trials_per_iter} per round); database {profile.database_dir()}",
        ),
        (
            "channel_multiple",
            f"pruned channel counts round to multiples of {profile.channel_multiple}",
        ),
    ]
    if profile.cross_compiler:
        rows.append(("cross_compiler", f"{profile.cross_compiler} links the deployable library"))
    if profile.peak_gflops and profile.memory_bandwidth_gbs:
        rows.append(
            (
                "roofline",
                f"{profile.peak_gflops:g} GFLOP/s peak, "
                f"{profile.memory_bandwidth_gbs:g} GB/s memory",
            )
        )
    return rows
