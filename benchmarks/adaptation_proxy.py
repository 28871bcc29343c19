"""Does the cheap adaptation proxy rank compressed candidates like the full measurement?

For >= 16 diverse candidates of the default base model (pruning 0-60%, 4-16-bit weights,
8-bit activations, adapters on/off per slot and of several sizes) this measures dev PER,
the proxy (few adapter steps on 3 speakers) and the full adaptation measurement (every
held-out speaker, the product's adaptation settings), then writes
``benchmarks/results/adaptation_proxy.json``. It also compares magnitude and
adaptation-aware pruning at 50% and the packed size of 4-bit weights.

Per-candidate results are appended to ``<work>/adaptation_proxy.rows.jsonl`` as they
finish, so an interrupted run resumes where it stopped.

    python benchmarks/adaptation_proxy.py --preset default --work work
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from _common import parser, provenance, write_result
from voxfit.compress import Recovery, adaptation_saliency, apply
from voxfit.data import FeatureStore, batches, collate, load_manifest, make_corpus, preset
from voxfit.metrics import packed_size_bytes, phone_error_rate
from voxfit.models import count_parameters
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan
from voxfit.train import (
    ProxyConfig,
    adapt_preset,
    adaptation_proxy,
    load_checkpoint,
    measure_adaptation,
    train_cached,
    train_preset,
)


def candidates(
    groups: list[str], layers: list[str], slots: list[str], dim: int, kd_steps: int = 300
) -> dict[str, Candidate]:
    """The benchmark's named candidates (deterministic)."""
    hidden = [g for g in groups if g != "stream"]
    every = tuple(AdapterPlan(s, dim) for s in slots)

    def c(
        name: str,
        *,
        keep: dict[str, float] | None = None,
        wbits: int = 32,
        abits: int = 32,
        adapters: tuple[AdapterPlan, ...] = every,
        importance: str = "magnitude",
        layer_subset: list[str] | None = None,
        recovery_steps: int = 0,
    ) -> tuple[str, Candidate]:
        return name, Candidate(
            groups=tuple(GroupPlan(g, r) for g, r in (keep or {}).items()),
            layers=tuple(
                LayerPlan(x, wbits, abits)
                for x in (layer_subset or layers)
                if (wbits, abits) != (32, 32)
            ),
            adapters=adapters,
            importance=importance,  # type: ignore[arg-type]
            recovery_steps=recovery_steps,
        )

    def at(*idx: int, d: int = dim) -> tuple[AdapterPlan, ...]:
        return tuple(AdapterPlan(slots[i], d) for i in idx)

    host_layers = [x for x in layers if x.startswith((f"{slots[-1]}.", f"{slots[-2]}."))]
    return dict(
        [
            c("fp32+adapters"),
            c("w8", wbits=8),
            c("w4", wbits=4),
            c("w4a8", wbits=4, abits=8),
            c("w16a16", wbits=16, abits=16),
            c("hidden25", keep={g: 0.75 for g in hidden}),
            c("hidden50", keep={g: 0.5 for g in hidden}),
            c("hidden60+w8", keep={g: 0.4 for g in hidden}, wbits=8),
            c("stream25+hidden25", keep={g: 0.75 for g in groups}),
            c("all50-magnitude", keep={g: 0.5 for g in groups}),
            c("all50-adaptation", keep={g: 0.5 for g in groups}, importance="adaptation"),
            c("adapters-last2", adapters=at(len(slots) - 2, len(slots) - 1)),
            c("adapters-first", adapters=at(0)),
            c("adapters-alt-d8", adapters=at(*range(0, len(slots), 2), d=8)),
            c("adapters-all-d4", adapters=tuple(AdapterPlan(s, 4) for s in slots)),
            c("no-adapters", adapters=()),
            c("lora-all-r8", adapters=tuple(AdapterPlan(x, 8, "lora") for x in slots)),
            c(
                "w4-adapter-hosts",
                wbits=4,
                adapters=at(len(slots) - 2, len(slots) - 1),
                layer_subset=host_layers,
            ),
            c("stream40", keep={"stream": 0.6}),
            c(
                "all30+w8a8-late-adapters",
                keep={g: 0.7 for g in groups},
                wbits=8,
                abits=8,
                adapters=at(*range(len(slots) // 2, len(slots)), d=32),
            ),
            # The 50% comparison again with a short distillation from the base model, as a
            # search candidate would get: without it, 50% pruning breaks both variants.
            c("all50-magnitude+kd", keep={g: 0.5 for g in groups}, recovery_steps=kd_steps),
            c(
                "all50-adaptation+kd",
                keep={g: 0.5 for g in groups},
                importance="adaptation",
                recovery_steps=kd_steps,
            ),
        ]
    )


def spearman(a: list[float], b: list[float]) -> float:
    return float(pd.Series(a).corr(pd.Series(b), method="spearman"))


def main(argv: list[str] | None = None) -> int:
    ap = parser("adaptation_proxy", __doc__, preset=True, model=True)
    ap.add_argument("--channel-multiple", type=int, default=8)
    ap.add_argument("--kd-steps", type=int, default=300, help="recovery steps of the +kd rows")
    args = ap.parse_args(argv)
    console = Console()
    t_start = time.monotonic()

    manifest = load_manifest(make_corpus(preset(args.preset), args.work / "corpus"))
    store = FeatureStore(manifest, args.work / "models" / "features")
    ckpt = load_checkpoint(
        train_cached(
            manifest,
            store,
            args.model,
            args.preset,
            train_preset(args.preset),
            args.work / "models",
        )
    )
    base, inv = ckpt.model, ckpt.inventory
    adapt = adapt_preset(args.preset)
    proxy = ProxyConfig()
    s = base.structure()  # type: ignore[operator]
    groups = [g.name for g in s.groups]
    slots = [x.name for x in s.adapter_slots]
    calib = [
        (b.feats, b.lengths)
        for b in (
            collate(g, store, inv) for g in list(batches(manifest.split("train"), 30.0))[::40][:4]
        )
    ]

    recovery = Recovery(manifest.split("train"), store, inv)
    rows_path = args.work / f"adaptation_proxy.{args.preset}.{args.model}.rows.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            row = json.loads(line)
            done[row["name"]] = row

    t0 = time.monotonic()
    saliency = adaptation_saliency(
        base, manifest.by_speaker("adapt"), store, inv, replace(adapt, steps=30)
    )
    saliency_s = time.monotonic() - t0
    base_full = measure_adaptation(base, manifest, store, inv, adapt)  # default adapters
    cands = candidates(groups, list(s.quantizable), slots, adapt.bottleneck, args.kd_steps)
    for i, (name, cand) in enumerate(cands.items()):
        if name in done and done[name]["plan_hash"] == cand.stable_hash():
            continue
        torch.manual_seed(0)
        model = apply(
            base,
            cand,
            channel_multiple=args.channel_multiple,
            saliency=saliency,
            calibration=calib,
            recovery=recovery,
        )
        dev = phone_error_rate(model, manifest.split("dev"), store, inv)
        px = adaptation_proxy(model, manifest, store, inv, adapt, proxy, slots=[])
        full = measure_adaptation(model, manifest, store, inv, adapt, slots=[])
        row = {
            "name": name,
            "plan_hash": cand.stable_hash(),
            "dev_per": dev,
            "proxy_post_adapt_per": px.per_after,
            "proxy_seconds": px.seconds,
            "full_pre_adapt_per": full.per_before,
            "full_post_adapt_per": full.per_after,
            "full_seconds": full.seconds,
            "retention": full.retention(base_full),
            "packed_bytes": packed_size_bytes(model),
            "params": count_parameters(model),
            "per_speaker": {
                x.speaker: [round(x.per_before, 3), round(x.per_after, 3)] for x in full.speakers
            },
            "plan": cand.to_dict(),
        }
        done[name] = row
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        console.print(
            f"[{i + 1}/{len(cands)}] {name}: dev {dev:.2f}  proxy {px.per_after:.2f}"
            f"  full {full.per_after:.2f}  ({full.seconds:.0f} s)"
        )

    rows = [done[n] for n in cands]
    full_post = [r["full_post_adapt_per"] for r in rows]
    fp32 = packed_size_bytes(base)
    w4 = packed_size_bytes(
        apply(base, Candidate(layers=tuple(LayerPlan(x, 4) for x in s.quantizable)))
    )
    result = {
        "spearman": spearman([r["proxy_post_adapt_per"] for r in rows], full_post),
        "dev_per_spearman": spearman([r["dev_per"] for r in rows], full_post),
        "proxy_cost_fraction": sum(r["proxy_seconds"] for r in rows)
        / sum(r["full_seconds"] for r in rows),
        "n_candidates": len(rows),
        "aware_post_adapt_per": done["all50-adaptation"]["full_post_adapt_per"],
        "magnitude_post_adapt_per": done["all50-magnitude"]["full_post_adapt_per"],
        "aware_retention": done["all50-adaptation"]["retention"],
        "magnitude_retention": done["all50-magnitude"]["retention"],
        "aware_post_adapt_per_kd": done["all50-adaptation+kd"]["full_post_adapt_per"],
        "magnitude_post_adapt_per_kd": done["all50-magnitude+kd"]["full_post_adapt_per"],
        "aware_dev_per_kd": done["all50-adaptation+kd"]["dev_per"],
        "magnitude_dev_per_kd": done["all50-magnitude+kd"]["dev_per"],
        "packed_size_ratio_4bit": w4 / fp32,
        "base": {
            "dev_per": phone_error_rate(base, manifest.split("dev"), store, inv),
            "pre_adapt_per": base_full.per_before,
            "post_adapt_per": base_full.per_after,
            "full_seconds": base_full.seconds,
            "packed_bytes": fp32,
        },
        "saliency_seconds": saliency_s,
        "proxy": {
            "n_speakers": proxy.n_speakers,
            "steps": proxy.steps,
            "max_eval_utts": proxy.max_eval_utts,
        },
        "channel_multiple": args.channel_multiple,
        "rows": rows,
        "provenance": provenance(
            {"torch": str(torch.__version__)},
            checkpoint=str(ckpt.path),
            script_minutes=round((time.monotonic() - t_start) / 60, 1),
        ),
    }
    write_result(args.out, result)

    t = Table(title="candidates: PER (%)")
    for col in ("candidate", "dev", "proxy post", "full pre", "full post", "retention", "MB"):
        t.add_column(col, justify="left" if col == "candidate" else "right")
    for r in rows:
        t.add_row(
            r["name"],
            f"{r['dev_per']:.2f}",
            f"{r['proxy_post_adapt_per']:.2f}",
            f"{r['full_pre_adapt_per']:.2f}",
            f"{r['full_post_adapt_per']:.2f}",
            f"{r['retention']:.2f}",
            f"{r['packed_bytes'] / 1e6:.2f}",
        )
    console.print(t)
    for k in (
        "spearman",
        "dev_per_spearman",
        "proxy_cost_fraction",
        "aware_post_adapt_per",
        "magnitude_post_adapt_per",
        "packed_size_ratio_4bit",
    ):
        console.print(f"{k}: {result[k]:.3f}")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
