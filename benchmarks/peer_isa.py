"""What the peer's ISA is worth: onnxruntime at the profile's ISA against the host's.

Times ONNX models (default: the int8 benchmark's fp32 and static-int8 base of the profile,
``<work>/int8/<profile>/onnx/``) with onnxruntime in child processes, one with this host's
CPUID and one restricted to the profile's mcpu (``voxfit.latency.restrict_cpuid``),
alternating in ``--rounds`` rounds (which goes first alternates too). Each child times every
model (``--repeats`` runs after 5 warm-up runs); the keys are medians of the per-round ratios
restricted / host. On a host that has nothing beyond the profile both children are alike
and the ratios are about 1.

    python benchmarks/peer_isa.py --profile x86-avx2-2core
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from _common import parser, provenance, resolve_profile, write_result
from voxfit.hw_profiles import describe_host


def _child(isa: str, profile: str, models: list[Path], threads: int, repeats: int) -> Any:
    cmd = [sys.executable, __file__, "--child", isa, "--profile", profile, "--repeats",
           str(repeats), "--threads", str(threads), *map(str, models)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"peer_isa child ({isa}) failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(argv: list[str]) -> int:
    """Time each model at ``host`` or ``profile`` ISA; print one JSON line."""
    ap = parser("peer_isa", __doc__, profile=True)
    ap.add_argument("--child", choices=["host", "profile"])
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("models", nargs="+", type=Path)
    args = ap.parse_args(argv)
    from voxfit.latency import restrict_cpuid

    profile = resolve_profile(args.profile)
    hidden = restrict_cpuid(profile.target) if args.child == "profile" else ()
    from voxfit.latency import time_onnxruntime

    frames = profile.primary_input.frames
    ms = {
        m.stem: time_onnxruntime(m, frames, args.threads, args.repeats)["median_ms"]
        for m in args.models
    }
    print(json.dumps({"hidden": list(hidden), "ms": ms}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        return child(argv)
    ap = parser("peer_isa", __doc__, profile=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=200, help="timed runs per model and child")
    ap.add_argument("models", nargs="*", type=Path, help="ONNX files (default: the int8 base's)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    profile = resolve_profile(args.profile or "x86-avx2-2core")
    models = args.models or [
        args.work / "int8" / profile.name / "onnx" / f"{n}.onnx" for n in ("fp32", "int8")
    ]
    for m in models:
        if not m.is_file():
            raise SystemExit(f"{m}: not found (run benchmarks/int8.py --profile {profile.name})")
    console = Console()
    rounds = []
    for i in range(args.rounds):
        order = ["host", "profile"] if i % 2 == 0 else ["profile", "host"]
        got = {i: _child(i, profile.name, models, profile.cores, args.repeats) for i in order}
        rounds.append(got)
        console.print(f"round {i + 1}: " + ", ".join(
            f"{m}: {got['profile']['ms'][m]:.3f} / {got['host']['ms'][m]:.3f} ms"
            for m in got["host"]["ms"]
        ))  # fmt: skip
    names = list(rounds[0]["host"]["ms"])
    result = {
        "profile": profile.name,
        "mcpu": profile.target.get("mcpu"),
        "hidden": rounds[0]["profile"]["hidden"],
        "models": [str(m) for m in models],
        # per model: median over rounds of restricted / host time
        "restricted_vs_host": {
            n: statistics.median(r["profile"]["ms"][n] / r["host"]["ms"][n] for r in rounds)
            for n in names
        },
        "rounds_ms": [{isa: r[isa]["ms"] for isa in ("host", "profile")} for r in rounds],
        "threads": profile.cores,
        "repeats": args.repeats,
        "host": describe_host().as_dict(),
        "provenance": provenance(wall_s=time.monotonic() - t0),
    }
    write_result(args.out, result)
    console.print(f"restricted / host: {result['restricted_vs_host']} (hidden {result['hidden']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
