"""What host is this: /proc/cpuinfo -> HostInfo, the microarchitecture table, same_host_kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxfit.hw_profiles import (
    HostInfo,
    check_recorded_host,
    describe_host,
    same_host_kind,
)

_AVX2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt aes avx f16c fma bmi1 avx2 bmi2 adx"
_AVX512 = f"{_AVX2} avx512f avx512dq avx512cd avx512bw avx512vl"


def cpuinfo(vendor: str, family: int, model: int, name: str, flags: str, n: int = 2) -> str:
    """A /proc/cpuinfo text with ``n`` processor blocks, as Linux prints them on x86."""
    block = (
        "processor\t: {i}\n"
        f"vendor_id\t: {vendor}\n"
        f"cpu family\t: {family}\n"
        f"model\t\t: {model}\n"
        f"model name\t: {name}\n"
        "stepping\t: 0\n"
        "cpu MHz\t\t: 2250.000\n"
        f"flags\t\t: {flags}\n"
        "bogomips\t: 4500.00\n"
    )
    return "\n".join(block.format(i=i) for i in range(n)) + "\n"


ZEN2 = cpuinfo("AuthenticAMD", 23, 49, "AMD EPYC 7B12", f"{_AVX2} clzero")
ZEN3 = cpuinfo("AuthenticAMD", 25, 1, "AMD EPYC 7B13", f"{_AVX2} clzero vaes")
ICELAKE = cpuinfo(
    "GenuineIntel", 6, 106, "Intel(R) Xeon(R) Platinum 8375C", f"{_AVX512} avx512_vnni avx512vbmi"
)
ARM = (
    "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\n"
)


def test_describes_a_zen2_host_from_its_cpuinfo_text() -> None:
    h = describe_host(ZEN2, cores=2)
    assert h.cpu_model == "AMD EPYC 7B12"
    assert (h.vendor, h.family, h.model, h.microarch, h.cores) == (
        "AuthenticAMD",
        23,
        49,
        "zen2",
        2,
    )
    assert h.isa == ("avx", "avx2", "f16c", "fma")
    assert len(h.flags_hash) == 12
    assert h.label == "AMD EPYC 7B12 (zen2, 2 cores)"
    assert h.known


def test_reads_a_file_too_and_counts_this_processs_cores_by_default(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text(ZEN3)
    h = describe_host(f)
    assert (h.microarch, h.cpu_model) == ("zen3", "AMD EPYC 7B13")
    assert h.cores >= 1


@pytest.mark.parametrize(
    ("vendor", "family", "model", "flags", "arch"),
    [
        ("AuthenticAMD", 23, 0x01, _AVX2, "zen"),
        ("AuthenticAMD", 23, 0x31, _AVX2, "zen2"),
        ("AuthenticAMD", 23, 0x71, _AVX2, "zen2"),
        ("AuthenticAMD", 25, 0x01, _AVX2, "zen3"),
        ("AuthenticAMD", 25, 0x21, _AVX2, "zen3"),
        ("AuthenticAMD", 25, 0x11, _AVX512, "zen4"),
        ("AuthenticAMD", 25, 0x61, _AVX512, "zen4"),
        ("AuthenticAMD", 26, 0x02, _AVX512, "zen5"),
        ("AuthenticAMD", 25, 0x30, _AVX2, "unknown"),  # not in the table: no guess
        ("AuthenticAMD", 21, 0x02, "avx fma", "unknown"),
        ("GenuineIntel", 6, 0x55, _AVX512, "skylake-avx512"),
        ("GenuineIntel", 6, 0x55, f"{_AVX512} avx512_vnni", "cascadelake"),
        ("GenuineIntel", 6, 0x55, f"{_AVX512} avx512_vnni avx512_bf16", "cooperlake"),
        ("GenuineIntel", 6, 0x6A, _AVX512, "icelake-server"),
        ("GenuineIntel", 6, 0x8F, _AVX512, "sapphirerapids"),
        ("GenuineIntel", 6, 0x3F, _AVX2, "haswell"),
        ("GenuineIntel", 6, 0x01, "", "unknown"),
        ("GenuineIntel", 15, 0x06, "", "unknown"),
    ],
)
def test_the_microarchitecture_table(
    vendor: str, family: int, model: int, flags: str, arch: str
) -> None:
    assert describe_host(cpuinfo(vendor, family, model, "cpu", flags), cores=1).microarch == arch


def test_an_arm_cpuinfo_gives_implementer_and_part_and_no_guess() -> None:
    h = describe_host(ARM, cores=4)
    assert (h.vendor, h.family, h.model, h.microarch) == ("0x41", None, 0xD0C, "unknown")
    assert h.cpu_model == "unknown"
    assert h.known
    assert "family None model 3340" in h.label


@pytest.mark.parametrize("source", ["", "garbage without colons\n", Path("/nonexistent/cpuinfo")])
def test_no_cpuinfo_is_unknown_never_a_crash(source: str | Path) -> None:
    h = describe_host(source, cores=2)
    assert (h.cpu_model, h.vendor, h.microarch, h.flags_hash) == ("unknown",) * 4
    assert (h.family, h.model, h.isa) == (None, None, ())
    assert not h.known


def test_this_machine_is_described_and_stable() -> None:
    h = describe_host()
    assert h is describe_host()  # read once per process
    assert h.cores >= 1
    assert describe_host(cores=7).cores == 7


def test_a_host_round_trips_through_its_dict() -> None:
    h = describe_host(ICELAKE, cores=8)
    assert HostInfo.from_dict(h.as_dict()) == h
    assert isinstance(h.as_dict()["isa"], list)
    assert HostInfo.from_dict({}).known is False


def test_same_kind_the_same_cpu_with_another_name_string() -> None:
    renamed = ZEN2.replace("AMD EPYC 7B12", "AMD EPYC")  # a hypervisor may shorten the name
    same, why = same_host_kind(describe_host(ZEN2, cores=2), describe_host(renamed, cores=2))
    assert same
    assert "one kind" in why


def test_zen2_and_zen3_differ_and_the_reason_names_both() -> None:
    same, why = same_host_kind(describe_host(ZEN2, cores=2), describe_host(ZEN3, cores=2))
    assert not same
    assert why.startswith("AMD EPYC 7B12 (zen2, 2 cores) vs AMD EPYC 7B13 (zen3, 2 cores)")
    assert "CPU family/model 23/49 vs 25/1" in why


def test_cores_and_isa_differences_are_named() -> None:
    zen2 = describe_host(ZEN2, cores=2)
    same, why = same_host_kind(zen2, describe_host(ZEN2, cores=4))
    assert not same
    assert "2 vs 4 cores" in why
    same, why = same_host_kind(zen2, describe_host(ICELAKE, cores=2))
    assert not same
    assert "vendor AuthenticAMD vs GenuineIntel" in why
    assert "avx512_vnni" in why
    assert "only on the second" in why


def test_an_unknown_host_cannot_be_compared_so_it_is_not_called_different() -> None:
    same, why = same_host_kind(describe_host(ZEN2, cores=2), describe_host("", cores=2))
    assert same
    assert "unknown" in why


def test_check_recorded_host_names_the_fitting_host_and_this_one() -> None:
    zen2, zen3 = describe_host(ZEN2, cores=2), describe_host(ZEN3, cores=2)
    same, why = check_recorded_host(zen2.as_dict(), zen3)
    assert not same
    assert why.startswith(
        "fitted on AMD EPYC 7B12 (zen2, 2 cores), running on AMD EPYC 7B13 (zen3, 2 cores)"
    )
    assert check_recorded_host(zen2.as_dict(), zen2)[0]
    same, why = check_recorded_host(None, zen3)
    assert same
    assert why.startswith("host unknown")
