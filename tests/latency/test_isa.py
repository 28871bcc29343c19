"""CPUID restricted to a profile's mcpu (voxfit.latency._isa): which features are hidden, and
in a child process, that CPUID, torch's dispatch and real crashes behave as on that CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from voxfit.hw_profiles import host_cpu_flags
from voxfit.latency import _isa, features_beyond

HASWELL = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
CASCADELAKE = {**HASWELL, "mcpu": "cascadelake"}
# an mcpu below every host this project runs on (no AVX): something is always hidden
V2 = {**HASWELL, "mcpu": "x86-64-v2"}

SAPPHIRE = frozenset({"avx", "fma", "avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"})


def test_an_avx2_profile_hides_avx512_vnni_and_amx_but_keeps_avx2() -> None:
    hidden = features_beyond(HASWELL, SAPPHIRE)
    assert {"avx512f", "avx512bw", "avx512vnni", "amx-int8"} <= set(hidden)
    assert not {"avx", "fma", "avx2"} & set(hidden)


def test_a_vnni_profile_keeps_vnni_and_hides_only_what_its_mcpu_lacks() -> None:
    hidden = features_beyond(CASCADELAKE, SAPPHIRE)
    assert set(hidden) == {"amx-int8"}
    # nothing the host lacks is listed, whatever the mcpu lacks
    assert features_beyond(HASWELL, frozenset({"avx", "fma", "avx2"})) == ()


def test_targets_that_are_not_an_x86_cpu_hide_nothing() -> None:
    assert features_beyond({"kind": "cuda", "arch": "sm_80"}, SAPPHIRE) == ()
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}
    assert features_beyond(arm, SAPPHIRE) == ()


def test_hiding_avx512_also_hides_its_register_state() -> None:
    quads = _isa._quads(("avx512f",))
    rows = [tuple(quads[i : i + 4]) for i in range(0, len(quads), 4)]
    assert (7, 0, 1, 1 << 16) in rows  # leaf 7, ebx bit 16
    # leaf 0xD eax: opmask, ZMM_Hi256, Hi16_ZMM
    assert {(0xD, 0, 0, 1 << b) for b in (5, 6, 7)} <= set(rows)


def _child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


needs_faulting = pytest.mark.skipif(
    "cpuid_fault" not in host_cpu_flags() or "avx2" not in host_cpu_flags(),
    reason="this CPU or hypervisor has no CPUID faulting (or no AVX2 to hide)",
)


@needs_faulting
def test_a_restricted_process_sees_the_profiles_cpu_and_torch_dispatches_for_it() -> None:
    done = _child(
        f"""
        from voxfit.latency import _isa, restrict_cpuid
        assert _isa.has_feature("avx2")
        hidden = restrict_cpuid({V2!r})
        import torch
        print(sorted(hidden), _isa.has_feature("avx2"), _isa.has_feature("avx"),
              _isa.has_feature("avx512f"), _isa.trapped() > 0,
              torch.backends.cpu.get_cpu_capability())
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert "'avx2'" in line
    assert "'fma'" in line
    # CPUID (trapped, not just a flag we keep) reports no AVX, AVX2 or AVX-512, and torch's
    # kernels dispatch for a CPU without AVX2
    assert line.endswith("False False False True DEFAULT"), line


@needs_faulting
def test_a_real_crash_in_a_restricted_process_still_crashes() -> None:
    done = _child(
        f"""
        import ctypes
        from voxfit.latency import restrict_cpuid
        restrict_cpuid({V2!r})
        ctypes.string_at(0)
        """
    )
    assert done.returncode == -11, (done.returncode, done.stderr[-500:])


@needs_faulting
def test_restricting_after_onnxruntime_was_imported_is_refused() -> None:
    done = _child(
        f"""
        import onnxruntime
        from voxfit.errors import ConfigError
        from voxfit.latency import restrict_cpuid
        try:
            restrict_cpuid({V2!r})
        except ConfigError as e:
            print("refused:", e)
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout
    assert "before onnxruntime is imported" in done.stdout
