"""The Conformer's attention as one op (``voxfit::attention``) against torch's split heads.

Each plan (the fp32 baseline, the front's peer point and best point of a search result) is
compiled twice for the profile: the deploy graph as it is now (every frame valid: each
attention layer is ``voxfit::attention``, three kernels) and as it was (the masked
split-heads attention torch decomposes into nine kernels per layer; ``lengths_optional``
off). Every library is timed in rounds alternating with the old fp32 graph's library (the
estimator's paired timing), ``--rounds`` times; the keys are medians of those relative
times, so the host's drift cancels. Weights do not change kernel times: the model is the
default Conformer with random weights unless ``--checkpoint`` names a trained one.

    python benchmarks/attention.py --plans benchmarks/results/search_conformer.json

Resumable: the tuning database under ``--work`` keeps what was tuned; a rerun measures warm.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from _common import parser, provenance, resolve_profile, write_result
from voxfit.compress import apply
from voxfit.latency import TvmLocalEstimator
from voxfit.models import build_named
from voxfit.plan import Candidate


def _plans(path: Path) -> dict[str, dict[str, Any]]:
    try:
        d = json.loads(path.read_text())
        plans = {"fp32": d["baselines"][0]["plan"]}
        for key in ("peer_point", "best"):
            if d.get(key):
                plans[f"{key} (#{d[key]['trial']})"] = d[key]["plan"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise SystemExit(f"{path}: not a search benchmark result ({type(e).__name__}: {e})") from e
    return plans


def main(argv: list[str] | None = None) -> int:
    ap = parser("attention", __doc__, profile=True)
    ap.add_argument("--plans", type=Path, default=Path("benchmarks/results/search_conformer.json"))
    ap.add_argument("--checkpoint", type=Path, default=None, help="a trained Conformer")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    console = Console()
    t0 = time.monotonic()
    profile = resolve_profile(args.profile or "x86-avx2-2core")
    torch.manual_seed(0)
    if args.checkpoint:
        from voxfit.train import load_checkpoint

        base = load_checkpoint(args.checkpoint).model.eval()
    else:
        base = build_named("conformer", 42).eval()
    calib = [(torch.randn(4, 200, 80), torch.full((4,), 200)) for _ in range(2)]
    models: dict[str, torch.nn.Module] = {}
    for name, raw in _plans(args.plans).items():
        for graph in ("old", "new"):
            m = apply(
                base,
                Candidate.from_dict(raw),
                calibration=calib,
                channel_multiple=profile.channel_multiple,
            )
            m.lengths_optional = graph == "new"  # type: ignore[assignment]
            models[f"{name}|{graph}"] = m
    work = args.work / "attention" / profile.name
    rel: dict[str, list[float]] = {k: [] for k in models}
    calls: dict[str, int] = {}
    with TvmLocalEstimator(
        profile,
        work / "builds",
        tuning_dir=work / "tuning",
        profile_calls=5,
        reference=models["fp32|old"],
    ) as est:
        for i in range(args.rounds):
            for key, m in models.items():
                (r,) = est.estimate(m, (profile.primary_input,))
                if not r.ok or r.relative is None:
                    console.print(f"[red]{key}: {r.error}")
                    return 1
                rel[key].append(r.relative)
                calls[key] = len(r.calls)
            done = ", ".join(f"{k} {v[-1]:.3f}" for k, v in rel.items())
            console.print(f"round {i + 1}/{args.rounds} (relative to fp32|old): {done}")
    med = {k: statistics.median(v) for k, v in rel.items()}
    rows: dict[str, dict[str, Any]] = {}
    for key in models:
        name, _, graph = key.partition("|")
        row = rows.setdefault(name, {})
        row[f"relative_{graph}"] = med[key]
        row[f"kernel_calls_{graph}"] = calls[key]
    for row in rows.values():
        row["speedup_new_vs_old"] = row["relative_old"] / row["relative_new"]
        row["vs_fp32_old_graph"] = rows["fp32"]["relative_old"] / row["relative_old"]
        row["vs_fp32_new_graph"] = rows["fp32"]["relative_new"] / row["relative_new"]
    result = {
        "profile": profile.name,
        "frames": profile.primary_input.frames,
        "plans": str(args.plans),
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "rounds": args.rounds,
        "fp32_speedup_new_vs_old": rows["fp32"]["speedup_new_vs_old"],
        "rows": rows,
        "relative_rounds": rel,
        "provenance": provenance({"torch": torch.__version__}, wall_s=time.monotonic() - t0),
    }
    write_result(args.out, result)
    for name, row in rows.items():
        console.print(
            f"{name}: one-op graph {row['speedup_new_vs_old']:.2f}x faster "
            f"({row['kernel_calls_old']} -> {row['kernel_calls_new']} kernel calls); "
            f"vs fp32 {row['vs_fp32_old_graph']:.2f}x -> {row['vs_fp32_new_graph']:.2f}x"
        )
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
