"""The peer at the profile's ISA: this process's CPUID as the profile's ``mcpu`` reports it.

TVM compiles for the profile's ``mcpu`` whatever the host is, but onnxruntime (MLAS) picks
its kernels from CPUID when it is imported: on an AVX-512 VNNI host it runs VNNI int8
kernels while TVM runs the AVX2 code an ``x86-avx2-2core`` profile asks for, so "front vs
onnxruntime" measures two ISAs. :func:`restrict_cpuid` makes CPUID report only what the
profile's ``mcpu`` has (LLVM's feature list for it, through TVM), with Linux's CPUID
faulting and a small trap handler (``cpuid_mask.c``, built with the system C compiler on
first use), as Intel SDE's CPU models do for a whole program. It must run before onnxruntime
is imported; it holds for the calling thread and every thread started after it (so call it
early, before thread pools start), not for programs the process executes (TVM's builder and
runner workers keep the whole CPU: their code is compiled for the profile anyway).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from voxfit.errors import ConfigError, VoxfitError

_SOURCE = Path(__file__).with_name("cpuid_mask.c")
_ANY = 0xFFFFFFFF  # a leaf that ignores the subleaf (ecx)
_EAX, _EBX, _ECX, _EDX = range(4)

# LLVM feature name -> (/proc/cpuinfo flag, leaf, subleaf, register, bit), from the Intel SDM
# (vol. 2A, CPUID) and AMD's APM vol. 3: the vector and matrix extensions a kernel library
# dispatches on. Features a profile's mcpu lacks are cleared.
_FEATURES: dict[str, tuple[str, int, int, int, int]] = {
    "avx": ("avx", 1, _ANY, _ECX, 28),
    "fma": ("fma", 1, _ANY, _ECX, 12),
    "f16c": ("f16c", 1, _ANY, _ECX, 29),
    "avx2": ("avx2", 7, 0, _EBX, 5),
    "avx512f": ("avx512f", 7, 0, _EBX, 16),
    "avx512dq": ("avx512dq", 7, 0, _EBX, 17),
    "avx512ifma": ("avx512ifma", 7, 0, _EBX, 21),
    "avx512cd": ("avx512cd", 7, 0, _EBX, 28),
    "avx512bw": ("avx512bw", 7, 0, _EBX, 30),
    "avx512vl": ("avx512vl", 7, 0, _EBX, 31),
    "avx512vbmi": ("avx512vbmi", 7, 0, _ECX, 1),
    "avx512vbmi2": ("avx512_vbmi2", 7, 0, _ECX, 6),
    "avx512vnni": ("avx512_vnni", 7, 0, _ECX, 11),
    "avx512bitalg": ("avx512_bitalg", 7, 0, _ECX, 12),
    "avx512vpopcntdq": ("avx512_vpopcntdq", 7, 0, _ECX, 14),
    "avx512vp2intersect": ("avx512_vp2intersect", 7, 0, _EDX, 8),
    "amx-bf16": ("amx_bf16", 7, 0, _EDX, 22),
    "avx512fp16": ("avx512_fp16", 7, 0, _EDX, 23),
    "amx-tile": ("amx_tile", 7, 0, _EDX, 24),
    "amx-int8": ("amx_int8", 7, 0, _EDX, 25),
    "avxvnni": ("avx_vnni", 7, 1, _EAX, 4),
    "avx512bf16": ("avx512_bf16", 7, 1, _EAX, 5),
    "avxifma": ("avx_ifma", 7, 1, _EAX, 23),
    "avxvnniint8": ("avx_vnni_int8", 7, 1, _EDX, 4),
    "avxneconvert": ("avx_ne_convert", 7, 1, _EDX, 5),
    "avxvnniint16": ("avx_vnni_int16", 7, 1, _EDX, 10),
}
# register state that goes with a feature (CPUID leaf 0xD, subleaf 0, eax: the XCR0 bits the
# CPU supports): YMM for AVX, opmask and ZMM for AVX-512, tile config and data for AMX
_STATE: dict[str, tuple[int, ...]] = {"avx": (2,), "avx512f": (5, 6, 7), "amx-tile": (17, 18)}
_hidden: tuple[str, ...] = ()  # what restrict_cpuid hid in this process


def mcpu_features(mcpu: str) -> frozenset[str]:
    """LLVM's features of an x86 ``mcpu`` (TVM's LLVM), e.g. ``haswell`` -> avx2, fma, ..."""
    from tvm.target import Target, codegen

    target = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
    return frozenset(str(k) for k in codegen.llvm_get_cpu_features(target))


def features_beyond(target: Mapping[str, Any], host_flags: frozenset[str]) -> tuple[str, ...]:
    """The features in this module's table that ``host_flags`` (/proc/cpuinfo spelling)
    has and the target's ``mcpu`` lacks, by LLVM name: what :func:`restrict_cpuid` hides.
    Empty for a target that is not an x86 CPU with a named ``mcpu``."""
    mcpu = target.get("mcpu")
    if target.get("kind") != "llvm" or not mcpu or not _x86(str(target.get("mtriple", ""))):
        return ()
    has = mcpu_features(str(mcpu))
    return tuple(n for n, (flag, *_) in _FEATURES.items() if flag in host_flags and n not in has)


def _x86(triple: str) -> bool:
    return triple.startswith(("x86_64", "amd64")) or not triple


def _quads(names: tuple[str, ...]) -> list[int]:
    """(leaf, subleaf, register, bits) per feature and per state bit, flattened for C."""
    out: list[int] = []
    for n in names:
        _, leaf, sub, reg, bit = _FEATURES[n]
        out += [leaf, sub, reg, 1 << bit]
        out += [q for b in _STATE.get(n, ()) for q in (0xD, 0, _EAX, 1 << b)]
    return out


@cache
def _library() -> ctypes.CDLL:
    """``cpuid_mask.c`` built once per source (system C compiler, ``$CC`` or ``cc``)."""
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"voxfit-cpuid-mask-{tag}-{os.getuid()}.so"
    if not path.exists():
        cc = os.environ.get("CC", "cc")
        if shutil.which(cc) is None:
            raise VoxfitError(f"restricting CPUID needs a C compiler: {cc!r} not found ($CC)")
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(_SOURCE)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise VoxfitError(f"{_SOURCE}: {cc} failed: {last}")
        tmp.replace(path)
    lib = ctypes.CDLL(str(path))
    lib.voxfit_cpuid_mask.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)]
    lib.voxfit_cpuid.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    lib.voxfit_cpuid_trapped.restype = ctypes.c_long
    return lib


def restrict_cpuid(target: Mapping[str, Any]) -> tuple[str, ...]:
    """Make CPUID in this process report only what ``target``'s ``mcpu`` has (of the
    features in this module's table); returns the features hidden, by LLVM name (empty: the
    host has nothing beyond the target, nothing is changed).

    Raises:
        ConfigError: onnxruntime is already imported (its kernels were chosen then).
        VoxfitError: this is not x86-64 Linux, the CPU or hypervisor has no CPUID faulting,
            or the trap handler cannot be built.
    """
    from voxfit.hw_profiles import host_cpu_flags

    hidden = features_beyond(target, host_cpu_flags())
    if not hidden:
        return ()
    if "onnxruntime" in sys.modules:
        raise ConfigError(
            f"CPUID can only be restricted to mcpu {target.get('mcpu')!r} before onnxruntime "
            "is imported: its kernels are chosen at import"
        )
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise VoxfitError(f"restricting CPUID needs x86-64 Linux, not {sys.platform}")
    quads = _quads(hidden)
    arr = (ctypes.c_uint32 * len(quads))(*quads)
    err = _library().voxfit_cpuid_mask(len(quads) // 4, arr)
    if err:
        raise VoxfitError(
            f"cannot restrict CPUID to mcpu {target.get('mcpu')!r}: arch_prctl(ARCH_SET_CPUID) "
            f"failed ({os.strerror(err)}); this CPU or hypervisor has no CPUID faulting"
        )
    global _hidden
    _hidden = hidden
    return hidden


def peer_isa(target: Mapping[str, Any]) -> dict[str, Any]:
    """Which ISA onnxruntime runs at here against ``target``: the features this process
    hides (``hidden``) and those the host has beyond the target's mcpu that it does not
    (``beyond_target``: non-empty, the peer may use instructions TVM's code may not)."""
    from voxfit.hw_profiles import host_cpu_flags

    beyond = features_beyond(target, host_cpu_flags())
    return {
        "mcpu": target.get("mcpu"),
        "hidden": list(_hidden),
        "beyond_target": [n for n in beyond if n not in _hidden],
    }


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of CPUID as this process sees it (restricted or not)."""
    r = (ctypes.c_uint32 * 4)()
    _library().voxfit_cpuid(leaf, subleaf, r)
    return (r[0], r[1], r[2], r[3])


def has_feature(name: str) -> bool:
    """Whether CPUID, as this process sees it, reports feature ``name`` (LLVM spelling, one
    of this module's table)."""
    _, leaf, sub, reg, bit = _FEATURES[name]
    return bool(cpuid(leaf, 0 if sub == _ANY else sub)[reg] >> bit & 1)


def trapped() -> int:
    """How many CPUID instructions this process has trapped since :func:`restrict_cpuid`."""
    return int(_library().voxfit_cpuid_trapped())
