"""Elastic (once-for-all) candidates against today's distilled ones.

For 10 plans spanning the space (every block's elastic widths at 25%, 50%, 75%, mixed
widths, 4- and 8-bit weights; 32-unit residual adapters in every block, as a search
candidate that keeps personalization), each candidate is built two ways and scored with the
search's accuracy (dev PER; PER of held-out speakers after adapting the plan's adapters:
the search's proxy, or every held-out speaker with ``--full``):

- inherited: sliced from the elastic checkpoint (``voxfit train --elastic``), BatchNorm
  recalibrated, quantized: no training (``build_s``);
- distilled: pruned from the base and distilled ``--steps`` steps (today's path), for the
  first ``--distill`` plans (each costs minutes; the search's build cache keeps them).

Also the elastic model's full width against the base (``full_subnet_dev_per_delta``). Each
finished row is appended to ``<work>/elastic/rows-<key>.jsonl`` (the base's rows keyed by the
base alone, so another supernet of it reuses its distilled rows): a rerun resumes.

    python benchmarks/elastic.py --base work/models/<base>/checkpoint.pt \\
        --elastic work/models/<base>-elastic-<hash>/checkpoint.pt [--distill 4] [--full]

Either family: a TDNN's widths are its blocks' hidden widths; a Conformer's are its FFNs',
attention heads' and conv module's channels, each at the smallest width the supernet
trained that is at least the plan's ratio (heads and conv channels stop at 50%).

``--make-run-storage URL`` (and ``--make-run-study``, default ``make-run``) also records what
``make run``'s 15-minute search on its elastic base finished (``make_run_trials``, target
>= 30; its minutes, median trial, the sampled trials on its front, and the supernet it used);
without it, those of the previous result at ``--out`` are kept (``make_run.kept_from``).
``hv_ratio_equal_wallclock`` comes from ``benchmarks/equal_time.py``'s result (``--equal-time``).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, parser, provenance, resolve_profile, write_result  # noqa: E402
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan  # noqa: E402
from voxfit.search import SearchContext  # noqa: E402
from voxfit.train import load_checkpoint  # noqa: E402


def hidden_widths(blocks: int, ratios: list[float]) -> tuple[GroupPlan, ...]:
    """Every block's hidden width, ``ratios`` repeated over the blocks (1.0: not pruned)."""
    return tuple(
        GroupPlan(f"blocks.{i}.hidden", ratios[i % len(ratios)])
        for i in range(blocks)
        if ratios[i % len(ratios)] < 1.0
    )


def block_widths(widths: dict[str, list[float]], ratios: list[float]) -> tuple[GroupPlan, ...]:
    """``ratios`` repeated over the blocks, for every per-block group the supernet made
    elastic (a TDNN's hidden width; a Conformer's FFNs, heads and conv channels), each at the
    smallest width it trained that is at least the ratio (a Conformer's heads stop at 50%)."""
    out = []
    for name, choices in widths.items():
        if not name.startswith("blocks."):
            continue  # the residual stream is not a per-block width
        want = ratios[int(name.split(".")[1]) % len(ratios)]
        ratio = min((w for w in choices if w >= want - 1e-9), default=1.0)
        if ratio < 1.0:
            out.append(GroupPlan(name, ratio))
    return tuple(out)


def _plans(
    widths: dict[str, list[float]], slots: tuple[str, ...], layers: tuple[str, ...]
) -> list[tuple[str, Candidate]]:
    """Named plans spanning the space: uniform and mixed widths, low-bit weights, a 32-unit
    residual adapter in every slot."""
    adapters = tuple(AdapterPlan(s, 32, "residual") for s in slots)

    def bits(b: int) -> tuple[LayerPlan, ...]:
        return tuple(LayerPlan(q, b if q != "head" else 8) for q in layers)

    table = [
        ("hidden25", [0.25], ()),
        ("hidden50", [0.5], ()),
        ("hidden75", [0.75], ()),
        ("mixed_25_100", [0.25, 1.0], ()),
        ("mixed_50_25_75", [0.5, 0.25, 0.75], ()),
        ("mixed_100_50", [1.0, 0.5], ()),
        ("hidden25_w4", [0.25], bits(4)),
        ("hidden50_w8", [0.5], bits(8)),
        ("mixed_75_25_w8", [0.75, 0.25], bits(8)),
        ("mixed_25_50_100_w4", [0.25, 0.5, 1.0], bits(4)),
    ]
    return [
        (name, Candidate(groups=block_widths(widths, r), layers=lay, adapters=adapters))
        for name, r, lay in table
    ]


def _make_run(storage: str, study_name: str) -> dict[str, Any]:
    """What a ``make run`` search finished, read from its study."""
    import optuna
    from optuna.trial import TrialState

    from voxfit.search import front_table

    st = optuna.load_study(study_name=study_name, storage=storage)
    done = [t for t in st.trials if t.state == TrialState.COMPLETE]
    if not done:
        raise SystemExit(f"{storage}: study {study_name!r} has no complete trial")
    front = front_table(st)
    ckpt = Path(str(st.user_attrs.get("checkpoint", "")))
    meta = dict(load_checkpoint(ckpt).meta.get("elastic") or {}) if ckpt.is_file() else {}
    return {
        "make_run_trials": len(done),
        "make_run": {
            "study": study_name,
            "search_minutes": (
                max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
            ).total_seconds()
            / 60,
            "median_trial_s": statistics.median(
                (t.datetime_complete - t.datetime_start).total_seconds() for t in done
            ),
            "front_size": len(front),
            "front_sampled": sum(1 for r in front if not r["baseline"]),
            "checkpoint": str(ckpt),
            "elastic_training": {k: meta.get(k) for k in ("steps", "minutes")},
        },
    }


def _make_run_or_kept(args: Any) -> dict[str, Any]:
    """``make run``'s figures from its storage, or, without one, those the previous result
    at ``--out`` holds (said so: ``make_run.kept_from``, that result's date)."""
    if args.make_run_storage:
        return _make_run(args.make_run_storage, args.make_run_study)
    if not args.out.exists():
        return {}
    old = json.loads(args.out.read_text())
    if "make_run" not in old:
        return {}
    when = (old.get("provenance") or {}).get("date")
    return {"make_run_trials": old.get("make_run_trials"),
            "make_run": {**old["make_run"], "kept_from": when}}  # fmt: skip


def _equal_time(path: Path) -> dict[str, Any]:
    """``hv_ratio_equal_wallclock`` from benchmarks/equal_time.py's result, when there is one."""
    if not path.exists():
        return {}
    r = json.loads(path.read_text())
    keep = ("minutes_per_arm", "hv_ratio_in_search", "fp32_baseline_relative", "checkpoints")
    return {
        "hv_ratio_equal_wallclock": r.get("hv_ratio_equal_wallclock"),
        "equal_time": {"file": path.name, "date": (r.get("provenance") or {}).get("date")}
        | {k: r.get(k) for k in keep},
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser("elastic", __doc__, profile=True)
    ap.add_argument("--base", type=Path, required=True, help="the base checkpoint")
    ap.add_argument("--elastic", type=Path, required=True, help="its elastic checkpoint")
    ap.add_argument("--steps", type=int, default=1000, help="distillation steps (today's)")
    ap.add_argument("--distill", type=int, default=10, help="plans also distilled")
    ap.add_argument("--full", action="store_true", help="adapt every held-out speaker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--make-run-storage", default=None, help="storage of make run's study")
    ap.add_argument("--make-run-study", default="make-run")
    ap.add_argument(
        "--equal-time",
        type=Path,
        default=RESULTS / "elastic_equal_time.json",
        help="benchmarks/equal_time.py's result: its hv_ratio_equal_wallclock joins this one",
    )
    args = ap.parse_args(argv)
    console = Console()
    t_start = time.monotonic()
    profile = resolve_profile(args.profile or "x86-avx2-2core")
    multiple = profile.channel_multiple
    base_ctx = SearchContext.prepare(work=args.work, checkpoint=args.base)
    el_ctx = SearchContext.prepare(work=args.work, checkpoint=args.elastic)
    el_ckpt = load_checkpoint(args.elastic)
    el_meta = dict(el_ckpt.meta.get("elastic") or {})
    structure = base_ctx.base.structure()  # type: ignore[operator]
    widths = el_ckpt.meta.get("elastic_widths")
    if not widths:
        raise SystemExit(f"{args.elastic}: not an elastic checkpoint (no elastic_widths)")
    slots = tuple(a.name for a in structure.adapter_slots)
    plans = _plans(widths, slots, structure.quantizable)

    def rows_file(*parts: Any) -> Path:
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]
        return args.work / "elastic" / f"rows-{key}.jsonl"

    # rows from the base (the distilled ones cost minutes each) are kept apart from the
    # elastic checkpoint's, so a later supernet of the same base reuses them as they were
    files = {
        "base": rows_file(str(args.base.resolve()), args.steps, args.full, args.seed, multiple),
        "elastic": rows_file(
            str(args.base.resolve()), str(args.elastic.resolve()), args.full, args.seed, multiple
        ),
    }
    done: dict[str, dict[str, Any]] = {}
    for f in files.values():
        f.parent.mkdir(parents=True, exist_ok=True)
        if f.exists():
            for line in f.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    done[r["key"]] = r

    def keep(row: dict[str, Any]) -> None:
        done[row["key"]] = row
        with files[row["from"]].open("a") as f:
            f.write(json.dumps(row) + "\n")

    def score(ctx: SearchContext, cand: Candidate, how: str) -> dict[str, Any]:
        t0 = time.monotonic()
        model = ctx.build(cand, multiple, args.seed)
        build_s = time.monotonic() - t0
        acc = ctx.accuracy(model, full=args.full)
        return {
            "build_s": build_s,
            "dev_per": acc["dev_per"],
            "post_adapt_per": acc["post_adapt_per"],
            "accuracy_s": acc["dev_s"] + acc["adapt_s"],
            "how": how,
        }

    todo = [("full", Candidate(), "base"), ("full", Candidate(), "elastic")]
    for i, (name, cand) in enumerate(plans):
        todo.append((name, cand, "elastic"))
        if i < args.distill:
            todo.append((name, replace(cand, recovery_steps=args.steps), "base"))
    for n, (name, cand, which) in enumerate(todo):
        k = f"{name}:{which}"
        if k in done:
            continue
        console.print(f"[{n + 1}/{len(todo)}] {name} from the {which} checkpoint")
        ctx = el_ctx if which == "elastic" else base_ctx
        how = "inherited" if which == "elastic" else f"distilled {cand.recovery_steps} steps"
        keep({"key": k, "plan": name, "from": which, **score(ctx, cand, how)})
        r = done[k]
        console.print(
            f"  dev PER {r['dev_per']:.2f}, post-adaptation {r['post_adapt_per']:.2f} "
            f"(build {r['build_s']:.1f} s)"
        )

    rows = []
    for name, _ in plans:
        inh, dis = done.get(f"{name}:elastic"), done.get(f"{name}:base")
        row: dict[str, Any] = {"plan": name}
        if inh:
            row |= {
                "inherited_dev_per": inh["dev_per"],
                "inherited_post_adapt_per": inh["post_adapt_per"],
                "inherit_build_s": inh["build_s"],
            }
        if dis:
            row |= {
                "distilled_dev_per": dis["dev_per"],
                "distilled_post_adapt_per": dis["post_adapt_per"],
                "distill_build_s": dis["build_s"],
                "dev_per_delta": inh["dev_per"] - dis["dev_per"] if inh else None,
                "post_adapt_per_delta": (
                    inh["post_adapt_per"] - dis["post_adapt_per"] if inh else None
                ),
            }
        rows.append(row)
    paired = [r for r in rows if r.get("dev_per_delta") is not None]
    full_b, full_e = done["full:base"], done["full:elastic"]

    def mean(xs: list[float]) -> float | None:
        return statistics.fmean(xs) if xs else None

    result = {
        "profile": profile.name,
        "base": str(args.base),
        "elastic": str(args.elastic),
        "distill_steps": args.steps,
        "adaptation": "full" if args.full else "proxy",
        "n_plans": len(plans),
        "n_paired": len(paired),
        "dev_per_delta_mean": mean([r["dev_per_delta"] for r in paired]),
        "dev_per_delta_max": max((r["dev_per_delta"] for r in paired), default=None),
        "post_adapt_per_delta_mean": mean([r["post_adapt_per_delta"] for r in paired]),
        "full_subnet_dev_per_delta": full_e["dev_per"] - full_b["dev_per"],
        "full_subnet_post_adapt_per_delta": full_e["post_adapt_per"] - full_b["post_adapt_per"],
        "base_dev_per": full_b["dev_per"],
        "elastic_full_dev_per": full_e["dev_per"],
        "build_s_median": statistics.median(
            r["inherit_build_s"] for r in rows if "inherit_build_s" in r
        ),
        "distill_build_s_median": (
            statistics.median(r["distill_build_s"] for r in paired) if paired else None
        ),
        **_make_run_or_kept(args),
        **_equal_time(args.equal_time),
        "rows": rows,
        # how the supernet was trained (its checkpoint's meta)
        "elastic_training": {k: el_meta.get(k) for k in ("steps", "minutes", "order")}
        | {"epochs": (el_meta.get("train_config") or {}).get("epochs")},
        "provenance": provenance(
            {"torch": torch.__version__},
            rows_files={k: str(f) for k, f in files.items()},
            wall_s=time.monotonic() - t_start,
        ),  # fmt: skip
    }
    write_result(args.out, result)
    for k in ("dev_per_delta_mean", "dev_per_delta_max", "post_adapt_per_delta_mean",
              "full_subnet_dev_per_delta", "build_s_median"):  # fmt: skip
        console.print(f"{k}: {result[k]}")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
