"""Can this machine run code built for a profile's target?

Code compiled for ``mcpu: skylake-avx512`` dies with SIGILL on a CPU without AVX-512, so a
``local`` measurement first checks the host's CPU flags against what the target's ``mcpu``
implies and fails with a sentence instead of a signal.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

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
    t = profile.target
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
    from ``profiles_dir`` (default: the shipped profiles).

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
    for p in paths:
        prof = load_profile(p)
        if prof.measurement.method != "local":
            continue
        ok, why = host_runs(prof)
        if ok:
            return prof
        reasons.append(f"{p.stem}: {why}")
    raise ConfigError(
        f"no local profile in {profiles_dir} runs on this CPU ({'; '.join(reasons)})"
    )
