"""Can this machine run code built for a profile's target, and what machine is it?

Code compiled for ``mcpu: skylake-avx512`` dies with SIGILL on a CPU without AVX-512, so a
``local`` measurement first checks the host's CPU flags against what the target's ``mcpu``
implies and fails with a sentence instead of a signal.

Two hosts that both run a profile are still two devices for latency (a cost model fitted on
one Zen generation put 96% of its held-out candidates within +-10%, and 69% on another), so
what was measured or fitted records the host (:class:`HostInfo`, :func:`describe_host`) and
:func:`same_host_kind` says whether two hosts differ in what decides latency.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from voxfit.hw_profiles._profile import HardwareProfile, load_profile

# Flags (as /proc/cpuinfo spells them) that LLVM assumes for an x86 mcpu.
_X86_MCPU_FLAGS: dict[str, frozenset[str]] = {
    "x86-64": frozenset(),
    "x86-64-v2": frozenset({"sse4_2", "popcnt"}),
    "x86-64-v3": frozenset({"avx2", "fma", "bmi2"}),
    "haswell": frozenset({"avx2", "fma", "bmi2"}),
    "broadwell": frozenset({"avx2", "fma", "bmi2", "adx"}),
    "skylake": frozenset({"avx2", "fma", "bmi2", "adx"}),
    "znver2": frozenset({"avx2", "fma", "bmi2", "clzero"}),
    "znver3": frozenset({"avx2", "fma", "bmi2", "clzero", "vaes"}),
    "x86-64-v4": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    "skylake-avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    "cascadelake": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    "icelake-client": frozenset({"avx512f", "avx512bw", "avx512_vnni", "avx512vbmi"}),
    "icelake-server": frozenset({"avx512f", "avx512bw", "avx512_vnni", "avx512vbmi"}),
    "znver4": frozenset({"avx512f", "avx512bw", "avx512_vnni"}),
    "sapphirerapids": frozenset({"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"}),
}


@cache
def host_cpu_flags() -> frozenset[str]:
    """CPU feature flags of this machine (empty where /proc/cpuinfo is unavailable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def host_runs(profile: HardwareProfile) -> tuple[bool, str]:
    """Whether code for ``profile.target`` runs here, and why not when it does not."""
    return target_runs_here(profile.target)


def target_runs_here(t: Mapping[str, Any]) -> tuple[bool, str]:
    """:func:`host_runs` for a bare target dict (``kind``, ``mtriple``, ``mcpu``), e.g. the
    one a bundle's report.json records."""
    if t["kind"] == "cuda":
        if Path("/dev/nvidiactl").exists():
            return True, "a CUDA device is present"
        return False, "the target is CUDA and this machine has no NVIDIA GPU"
    machine = platform.machine()
    triple = str(t.get("mtriple", ""))
    if triple and not triple.startswith(machine):
        return False, f"the target triple is {triple} and this machine is {machine}"
    mcpu = t.get("mcpu")
    if mcpu is None or machine != "x86_64":
        return True, "no CPU model named"
    need = _X86_MCPU_FLAGS.get(str(mcpu))
    if need is None:
        return False, f"mcpu {mcpu!r} is not in voxfit's flag table; cannot check this CPU"
    missing = sorted(need - host_cpu_flags())
    if missing:
        return False, f"mcpu {mcpu!r} needs CPU flags {', '.join(missing)} this CPU lacks"
    return True, f"this CPU has the flags mcpu {mcpu!r} needs"


def pick_local_profile(profiles_dir: str | Path | None = None) -> HardwareProfile:
    """The first ``local`` profile (sorted by name, ``x86-avx512-*`` first) this host runs,
    from ``profiles_dir`` (default: the shipped profiles). Profiles seeded from another
    (``tuning.seed_from``: a device being onboarded, such as ``x86-avx2-1core``) come after
    every profile that is not, so the default is the one that ships its own tuning records.

    Raises:
        ConfigError: the folder has no profile, or none of its local profiles runs here (with
            each one's reason).
    """
    from voxfit.errors import ConfigError
    from voxfit.hw_profiles._profile import SHIPPED_PROFILES

    profiles_dir = SHIPPED_PROFILES if profiles_dir is None else Path(profiles_dir)
    paths = sorted(
        profiles_dir.glob("*.yaml"),
        key=lambda p: (not p.stem.startswith("x86-avx512"), p.stem),
    )
    if not paths:
        raise ConfigError(f"{profiles_dir}: no hardware profile (*.yaml) in this folder")
    reasons = []
    loaded = [(p, load_profile(p)) for p in paths]
    for p, prof in sorted(loaded, key=lambda x: x[1].tuning.seed_from is not None):  # stable
        if prof.measurement.method != "local":
            continue
        ok, why = host_runs(prof)
        if ok:
            return prof
        reasons.append(f"{p.stem}: {why}")
    raise ConfigError(
        f"no local profile in {profiles_dir} runs on this CPU ({'; '.join(reasons)})"
    )


# -- what machine is this ------------------------------------------------------------------

UNKNOWN = "unknown"

# Microarchitecture by (vendor_id, cpu family, model range), from the vendors' published
# family/model numbers; a CPU outside these rows is "unknown" (it is still compared by its
# family and model). AMD family 17h: models 00-2F are Zen/Zen+ (Naples 01, Pinnacle Ridge 08,
# Raven Ridge 11, Picasso 18, Dali 20), 30-FF Zen 2 (Rome 31, Renoir 60, Matisse 71, Van Gogh
# 90, Mendocino A0). Family 19h: Zen 3 at 00-0F (Milan 01), 20-2F (Vermeer 21), 40-5F
# (Rembrandt 44, Cezanne 50); Zen 4 at 10-1F (Genoa 11), 60-7F (Raphael 61, Phoenix 74),
# A0-AF (Bergamo/Siena A0). Family 1Ah: Zen 5 at 00-2F (Turin 02, Turin Dense 11, Strix 24),
# 40-4F (Granite Ridge 44), 60-7F (Krackan 60, Strix Halo 70).
_AMD_RANGES: tuple[tuple[int, int, int, str], ...] = (
    (0x17, 0x00, 0x2F, "zen"),
    (0x17, 0x30, 0xFF, "zen2"),
    (0x19, 0x00, 0x0F, "zen3"),
    (0x19, 0x10, 0x1F, "zen4"),
    (0x19, 0x20, 0x2F, "zen3"),
    (0x19, 0x40, 0x5F, "zen3"),
    (0x19, 0x60, 0x7F, "zen4"),
    (0x19, 0xA0, 0xAF, "zen4"),
    (0x1A, 0x00, 0x2F, "zen5"),
    (0x1A, 0x40, 0x4F, "zen5"),
    (0x1A, 0x60, 0x7F, "zen5"),
)
# Intel family 6 models (LLVM's sys::getHostCPUName uses the same numbers). Model 0x55 is
# Skylake-SP, Cascade Lake and Cooper Lake alike; as LLVM does, the flags tell them apart.
_INTEL_FAMILY6: dict[int, str] = {
    **dict.fromkeys((0x3C, 0x3F, 0x45, 0x46), "haswell"),
    **dict.fromkeys((0x3D, 0x47, 0x4F, 0x56), "broadwell"),
    **dict.fromkeys((0x4E, 0x5E, 0x8E, 0x9E, 0xA5, 0xA6), "skylake"),
    0x55: "skylake-avx512",
    **dict.fromkeys((0x6A, 0x6C), "icelake-server"),
    **dict.fromkeys((0x7D, 0x7E), "icelake-client"),
    **dict.fromkeys((0x8C, 0x8D), "tigerlake"),
    **dict.fromkeys((0x97, 0x9A), "alderlake"),
    **dict.fromkeys((0xB7, 0xBA, 0xBF), "raptorlake"),
    0x8F: "sapphirerapids",
    0xCF: "emeraldrapids",
}


def _microarch(vendor: str, family: int | None, model: int | None, flags: frozenset[str]) -> str:
    """The table above; ``unknown`` for anything it does not list."""
    if family is None or model is None:
        return UNKNOWN
    if vendor == "AuthenticAMD":
        for fam, lo, hi, name in _AMD_RANGES:
            if family == fam and lo <= model <= hi:
                return name
        return UNKNOWN
    if vendor == "GenuineIntel" and family == 6:
        name = _INTEL_FAMILY6.get(model, UNKNOWN)
        if name == "skylake-avx512":
            if "avx512_bf16" in flags:
                return "cooperlake"
            if "avx512_vnni" in flags:
                return "cascadelake"
        return name
    return UNKNOWN


def _latency_isa(flags: frozenset[str]) -> tuple[str, ...]:
    """The flags that change which vector code LLVM emits and how fast it runs: AVX, AVX2,
    FMA, F16C, every AVX-512 subset, AVX-VNNI and AMX."""
    keep = {"avx", "avx2", "fma", "f16c", "avx_vnni"}
    return tuple(sorted(f for f in flags if f in keep or f.startswith(("avx512", "amx"))))


@dataclass(frozen=True, slots=True)
class HostInfo:
    """What decides a model's latency on this machine, as a card records it.

    ``vendor`` is /proc/cpuinfo's ``vendor_id`` (``AuthenticAMD``, ``GenuineIntel``; on Arm
    the ``CPU implementer``); ``family`` and ``model`` its numbers (None where not given);
    ``microarch`` from a small documented table (``unknown`` outside it); ``cores`` the CPUs
    this process may run on (0 = unknown); ``flags_hash`` the first 12 hex digits of the
    sha256 of all CPU flags, sorted (``unknown`` without flags); ``isa`` the flags that
    matter for vector code (see :func:`same_host_kind`).
    """

    cpu_model: str
    vendor: str
    family: int | None
    model: int | None
    microarch: str
    cores: int
    flags_hash: str
    isa: tuple[str, ...] = ()

    @property
    def known(self) -> bool:
        """Whether /proc/cpuinfo described the CPU at all."""
        return self.vendor != UNKNOWN

    @property
    def label(self) -> str:
        """E.g. ``AMD EPYC 7B12 (zen2, 2 cores)``."""
        if self.microarch != UNKNOWN:
            arch = self.microarch
        elif self.family is not None or self.model is not None:
            arch = f"family {self.family} model {self.model}"
        else:
            arch = "unknown microarchitecture"
        cores = f"{self.cores} cores" if self.cores else "cores unknown"
        return f"{self.cpu_model} ({arch}, {cores})"

    @property
    def key(self) -> str:
        """A folder name for what was measured on this kind of host, e.g.
        ``genuineintel-6-167-2c-3f9a0c1d2e4b``: vendor, family, model, cores, flags hash."""
        raw = f"{self.vendor}-{self.family}-{self.model}-{self.cores}c-{self.flags_hash}"
        return re.sub(r"[^a-z0-9.-]+", "_", raw.lower())

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a YAML card (``isa`` as a list)."""
        d = asdict(self)
        d["isa"] = list(self.isa)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HostInfo:
        """The inverse of :meth:`as_dict`; missing fields read as unknown."""

        def _int(v: Any) -> int | None:
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        return cls(
            cpu_model=str(d.get("cpu_model", UNKNOWN)),
            vendor=str(d.get("vendor", UNKNOWN)),
            family=_int(d.get("family")),
            model=_int(d.get("model")),
            microarch=str(d.get("microarch", UNKNOWN)),
            cores=_int(d.get("cores")) or 0,
            flags_hash=str(d.get("flags_hash", UNKNOWN)),
            isa=tuple(str(f) for f in d.get("isa") or ()),
        )

    def differences(
        self, other: HostInfo, names: tuple[str, str] = ("the first", "the second")
    ) -> tuple[str, ...]:
        """What differs between the two hosts for latency, one phrase each (empty when they
        are of one kind). ``names`` name ``self`` and ``other`` in the phrases."""
        out = []
        if self.vendor != other.vendor:
            out.append(f"vendor {self.vendor} vs {other.vendor}")
        elif (self.family, self.model) != (other.family, other.model):
            out.append(
                f"CPU family/model {self.family}/{self.model} vs {other.family}/{other.model}"
            )
        if self.cores and other.cores and self.cores != other.cores:
            out.append(f"{self.cores} vs {other.cores} cores")
        mine, theirs = set(self.isa), set(other.isa)
        if mine - theirs:
            out.append(f"{', '.join(sorted(mine - theirs))} only on {names[0]}")
        if theirs - mine:
            out.append(f"{', '.join(sorted(theirs - mine))} only on {names[1]}")
        return tuple(out)


def _field(block: dict[str, str], *keys: str) -> str | None:
    for k in keys:
        if block.get(k):
            return block[k]
    return None


def _number(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text, 0)  # "25" on x86, "0xd0c" for an Arm CPU part
    except ValueError:
        return None


def _process_cores() -> int:
    # the CPUs this process may use (a container's cpuset), not the machine's
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 0


def describe_host(cpuinfo: str | Path | None = None, *, cores: int | None = None) -> HostInfo:
    """Describe a host from /proc/cpuinfo: this one by default, or the given text or file.

    Only the first processor block is read (every core of a host is one kind). On x86 the
    keys are ``vendor_id``, ``cpu family``, ``model``, ``model name`` and ``flags``; on Arm
    ``CPU implementer``, ``CPU part`` and ``Features``.

    Args:
        cpuinfo: the file's text, or a path to it; None reads this machine's.
        cores: the core count to record; None counts the CPUs this process may run on
            (``os.sched_getaffinity``). Read before TVM runs: its thread pool can shrink the
            affinity, so this machine's own description is taken once per process.

    Never raises: a missing or unreadable file gives fields ``unknown`` (numbers None).
    """
    if cpuinfo is None:
        info = _this_host()
        return info if cores is None else replace(info, cores=cores)
    if isinstance(cpuinfo, Path):
        try:
            text = cpuinfo.read_text()
        except OSError:
            text = ""
    else:
        text = cpuinfo
    return _parse(text, _process_cores() if cores is None else cores)


@cache
def _this_host() -> HostInfo:
    return describe_host(Path("/proc/cpuinfo"))


def _parse(text: str, cores: int) -> HostInfo:
    block: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if block:
                break  # the first processor's block is enough
            continue
        key, sep, value = line.partition(":")
        if sep:
            block.setdefault(key.strip(), value.strip())
    flags = frozenset((_field(block, "flags", "Features") or "").split())
    vendor = _field(block, "vendor_id", "CPU implementer") or UNKNOWN
    family = _number(_field(block, "cpu family"))
    model = _number(_field(block, "model", "CPU part"))
    return HostInfo(
        cpu_model=_field(block, "model name") or UNKNOWN,
        vendor=vendor,
        family=family,
        model=model,
        microarch=_microarch(vendor, family, model, flags),
        cores=cores,
        flags_hash=(
            hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12] if flags else UNKNOWN
        ),
        isa=_latency_isa(flags),
    )


def same_host_kind(a: HostInfo, b: HostInfo) -> tuple[bool, str]:
    """Whether ``a`` and ``b`` are one kind of machine for latency, and why (a sentence
    naming both).

    Compared: vendor, CPU family and model (which fix the microarchitecture, caches and
    vector units), core count, and the vector ISA flags (:attr:`HostInfo.isa`). Not
    compared: the model name string (a hypervisor may shorten it), clock, the other flags.

    Returns False only when both hosts are known and differ; a host that /proc/cpuinfo did
    not describe cannot be compared, and that is (True, "... unknown ...").
    """
    if not a.known or not b.known:
        which = a.label if not a.known else b.label
        return True, f"cannot compare hosts: {which} is unknown"
    diffs = a.differences(b)
    if diffs:
        return False, f"{a.label} vs {b.label}: {'; '.join(diffs)}"
    return True, f"{a.label} and {b.label} are one kind"


def check_recorded_host(
    recorded: Mapping[str, Any] | None, current: HostInfo | None = None
) -> tuple[bool, str]:
    """Compare the host a model was fitted on (``recorded``, :meth:`HostInfo.as_dict` as a
    card stores it; None for a card that predates it) with ``current`` (default: this
    machine).

    Returns (False, "fitted on X, running on Y: what differs") only when both are known and
    differ in kind (:func:`same_host_kind`); an unrecorded or unknown host is (True, "host
    unknown: ...").
    """
    if not isinstance(recorded, Mapping):
        return True, "host unknown: the card does not record the CPU it was fitted on"
    fitted = HostInfo.from_dict(recorded)
    here = describe_host() if current is None else current
    if not fitted.known or not here.known:
        return True, f"host unknown: fitted on {fitted.label}, running on {here.label}"
    diffs = fitted.differences(here, names=("the fitting host", "this host"))
    if diffs:
        return False, f"fitted on {fitted.label}, running on {here.label}: {'; '.join(diffs)}"
    return True, f"fitted on {fitted.label}, running on {here.label}: one kind"
