"""What the benchmark scripts share: their common options, the profile, the results file.

Imported by sibling scripts as ``from _common import ...`` (a script's own folder is first on
``sys.path`` when it runs as ``python benchmarks/<name>.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from voxfit import __version__
from voxfit.hw_profiles import HardwareProfile, find_profile, load_profile, pick_local_profile

RESULTS = Path(__file__).resolve().parent / "results"


def parser(
    name: str,
    doc: str | None,
    *,
    profile: bool = False,
    space: bool = False,
    preset: bool = False,
    model: bool = False,
    cost_models: bool = False,
    peer_isa: bool = False,
) -> argparse.ArgumentParser:
    """The parser of benchmark ``name``: ``--work`` and ``--out`` (``results/<name>.json``),
    plus the shared options asked for; the description is the docstring's first line.

    Args:
        name: the results file's stem, e.g. ``"latency"``.
        doc: the script's ``__doc__``.
        profile: ``--profile NAME|FILE`` (default None: see ``resolve_profile``).
        space: ``--space`` (default ``tdnn-default``).
        preset: ``--preset tiny|default`` (default ``default``).
        model: ``--model tdnn|conformer`` (default ``tdnn``).
        cost_models: ``--cost-models DIR`` (default ``cost_models``).
        peer_isa: ``--peer-isa profile|host`` (default ``profile``: see ``restrict_peer``).
    """
    ap = argparse.ArgumentParser(description=(doc or name).strip().splitlines()[0])
    if profile:
        ap.add_argument(
            "--profile",
            default=None,
            help="name or file (default: the first local profile this CPU runs)",
        )
    if space:
        ap.add_argument("--space", default="tdnn-default")
    if preset:
        ap.add_argument("--preset", default="default", choices=["tiny", "default"])
    if model:
        ap.add_argument("--model", default="tdnn", choices=["tdnn", "conformer"])
    ap.add_argument("--work", type=Path, default=Path("work"))
    if cost_models:
        ap.add_argument("--cost-models", type=Path, default=Path("cost_models"))
    if peer_isa:
        ap.add_argument(
            "--peer-isa",
            default="profile",
            choices=["profile", "host"],
            help="the ISA onnxruntime runs at: the profile's mcpu (CPUID restricted in this "
            "process where the host has more, e.g. VNNI on an AVX2 profile) or all of the host's",
        )
    ap.add_argument("--out", type=Path, default=RESULTS / f"{name}.json")
    return ap


def restrict_peer(profile: HardwareProfile, peer_isa: str) -> dict[str, Any]:
    """With ``peer_isa == "profile"`` and a local profile, restrict this process's CPUID to
    the profile's mcpu before onnxruntime is imported (``voxfit.latency.restrict_cpuid``), so
    the peer runs the kernels the profile's device would pick, as TVM's code does. Returns
    what the results file records: the choice, and ``voxfit.latency.peer_isa``'s record (the
    features hidden, those the host has beyond the profile that were not), as a study's
    ``peer`` attribute records it."""
    from voxfit.latency import peer_isa as isa_record
    from voxfit.latency import restrict_cpuid

    if peer_isa == "profile" and profile.measurement.method == "local":
        restrict_cpuid(profile.target)
    return {"isa": peer_isa, **isa_record(profile.target)}


def resolve_profile(name: str | None) -> HardwareProfile:
    """The profile named (a shipped name or a file), or the first local one this CPU runs."""
    return load_profile(find_profile(name)) if name else pick_local_profile()


def provenance(versions: Mapping[str, Any] | None = None, **facts: Any) -> dict[str, Any]:
    """Where a result came from: voxfit's version, ``versions`` (e.g. torch), Python's,
    then ``facts`` (checkpoint, cpu, timing...) and the date (UTC, seconds)."""
    return {
        "voxfit": __version__,
        **(versions or {}),
        "python": platform.python_version(),
        **facts,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_result(
    path: Path, result: Mapping[str, Any], default: Callable[[Any], Any] | None = None
) -> None:
    """Write ``result`` as indented JSON (its folder made if missing); ``default`` as in
    ``json.dumps`` (None: a value JSON cannot hold is an error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=default) + "\n")
