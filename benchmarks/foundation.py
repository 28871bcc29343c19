"""Foundation figures: corpus -> base model -> dev PER and per-speaker adaptation gain.

Runs (or reuses, by content hash) the same steps as `voxfit data make` and `voxfit train`,
then writes ``benchmarks/results/foundation.json`` and prints the figures as a table.

Each family's figures go under ``by_model`` (the other families' already there are kept);
the TDNN's are also the file's top-level figures, as they were before other families.

    python benchmarks/foundation.py --preset default --model tdnn --work work
    python benchmarks/foundation.py --preset default --model conformer --work work
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch

from _common import parser, provenance, write_result
from voxfit.cli import print_report
from voxfit.data import FeatureStore, load_manifest, make_corpus, preset
from voxfit.train import adapt_preset, evaluate_cached, load_checkpoint, train_cached, train_preset


def main(argv: list[str] | None = None) -> int:
    args = parser("foundation", __doc__, preset=True, model=True).parse_args(argv)

    t0 = time.monotonic()
    manifest = load_manifest(make_corpus(preset(args.preset), args.work / "corpus"))
    store = FeatureStore(manifest, args.work / "models" / "features")
    path = train_cached(
        manifest, store, args.model, args.preset, train_preset(args.preset), args.work / "models"
    )
    report = evaluate_cached(load_checkpoint(path), manifest, store, adapt_preset(args.preset))
    print_report(report)
    result = {
        "dev_per": round(report.dev_per, 3),
        "heldout_per_before": round(report.heldout_per_before, 3),
        "heldout_per_after": round(report.heldout_per_after, 3),
        "relative_reduction": round(report.relative_reduction, 4),
        "adapter_param_fraction": round(report.adapter_param_fraction, 5),
        "train_minutes": round(report.train_minutes, 2),
        "n_train_speakers": report.n_train_speakers,
        "n_heldout_speakers": report.n_heldout_speakers,
        "n_params": report.n_params,
        "adapter_params": report.adapter_params,
        "adapt_seconds": round(report.adapt_seconds, 1),
        "per_speaker": [
            {
                "speaker": r.speaker,
                "per_before": round(r.per_before, 3),
                "per_after": round(r.per_after, 3),
            }
            for r in report.speakers
        ],
        "preset": args.preset,
        "model": args.model,
        "corpus": manifest.source.parent.name,
        "checkpoint": str(path),
        "provenance": provenance(
            {"torch": str(torch.__version__)},
            machine=platform.machine(),
            cpus=len(os.sched_getaffinity(0)),
            script_seconds=round(time.monotonic() - t0, 1),
        ),
    }
    try:
        before = json.loads(args.out.read_text())
    except (OSError, ValueError):
        before = {}
    flat = {k: v for k, v in before.items() if k != "by_model"}  # the top-level figures
    by_model = dict(before.get("by_model") or {})
    if "model" in flat and flat["model"] not in by_model:  # written before by_model
        by_model[flat["model"]] = flat
    by_model[args.model] = result
    top = result if args.model == "tdnn" else flat
    write_result(args.out, {**top, "by_model": by_model})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
