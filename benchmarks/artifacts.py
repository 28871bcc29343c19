"""Bundles vs what the search promised: sizes, packed vs float32 latency, conformance.

For the baselines and the Pareto front of a study (default: ``make run``'s), each plan is
exported as a bundle (packed TVM library, ONNX at the plan's bit-widths), and:

- the size objective vs the bytes of the TVM library's weights (its constants) and of
  model.onnx (``max_tvm_size_ratio``, ``max_onnx_size_ratio``: the worst over all rows);
- the latency of the packed library vs a float32-weights library of the same plan, timed in
  alternating rounds in one process (``packed_vs_fp32_latency``: packed / float32, < 1 =
  the packed one is faster);
- the bundle's conformance pair through its front end, onnxruntime and the TVM library
  (``conformance_ok``), and the frame agreement of every pair of torch / ONNX / TVM outputs
  on it (``min_frame_agreement``: the worst pair over all rows).

Run: ``python benchmarks/artifacts.py [--study make-run --storage sqlite:///work/search/
voxfit.db --work work]``. Bundles go to ``WORK/artifacts/<study>/``; a finished row is kept in
``WORK/artifacts/<study>/rows.json`` and not redone (resumable). Writes
``benchmarks/results/artifacts.json`` and a plotly chart beside it (``artifacts.html``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import parser, provenance, write_result


def _agreement(a: np.ndarray, b: np.ndarray, n: int) -> float:
    return float(np.mean(a[0, :n].argmax(-1) == b[0, :n].argmax(-1))) if n else 1.0


def _outputs(bundle: Path, worker: Any) -> tuple[dict[str, np.ndarray], int]:
    """torch (the bundle's expected output), ONNX and TVM outputs on the conformance input."""
    import onnxruntime as ort

    conf = bundle / "conformance"
    x = np.load(conf / "input.npy")
    lengths = np.load(conf / "input_lengths.npy")
    n = int(np.load(conf / "expected_lengths.npy")[0])
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    report = json.loads((bundle / "report.json").read_text())
    lib = (bundle / report["tvm"]["lib"]).resolve()
    r = worker.call("run_local", timeout_s=300, lib=str(lib), input=x)
    if "error" in r:
        raise RuntimeError(f"{lib}: {r['error']}")
    return {
        "torch": np.load(conf / "expected_log_probs.npy"),
        "onnx": sess.run(None, {"feats": x, "lengths": lengths})[0],
        "tvm": np.asarray(r["output"]),
    }, n


def _row(
    ctx: Any, study: Any, trial: Any, profile: Any, work: Path, cost_models: Path, worker: Any
) -> dict[str, Any]:
    from voxfit.compile import compile_model, default_tuning_dir
    from voxfit.metrics import packed_size_bytes
    from voxfit.search import check_bundle, export_bundle, record_of

    rec = record_of(trial)
    out = work / "artifacts" / study.study_name
    tuning = default_tuning_dir(work, profile)
    t0 = time.monotonic()
    bundle = export_bundle(
        ctx,
        study,
        trial,
        profile,
        out,
        tuning_dir=tuning,
        worker=worker,
        cost_models_dir=cost_models,
    )
    export_s = time.monotonic() - t0
    report = json.loads((bundle / "report.json").read_text())
    model = ctx.build(rec.plan, profile.channel_multiple, rec.seed)
    objective = packed_size_bytes(model)
    check = check_bundle(bundle)
    outs, n = _outputs(bundle, worker)
    pairs = {
        f"{a}_vs_{b}": _agreement(outs[a], outs[b], n)
        for a, b in (("onnx", "tvm"), ("onnx", "torch"), ("tvm", "torch"))
    }
    # the same plan with float32 weights, timed against the bundle's packed library
    spec = profile.primary_input
    (f,) = compile_model(
        model,
        profile,
        worker,
        out / f"fp32-{trial.number}",
        inputs=(spec,),
        cost_models_dir=cost_models,
        tuning_dir=tuning,
        export=False,
        pack=False,
    )
    if not f.ok:
        raise RuntimeError(f"float32 build of trial {trial.number}: {f.error}")
    m = profile.to_dict()["measurement"] | {"repeats": 31}
    packed_lib = str((bundle / report["tvm"]["lib"]).resolve())
    t = worker.call(
        "measure_local",
        timeout_s=600,
        lib=packed_lib,
        frames=spec.frames,
        measurement=m,
        reference=str(f.lib),
    )
    if "error" in t:
        raise RuntimeError(f"timing trial {trial.number}: {t['error']}")
    return {
        "trial": trial.number,
        "baseline": rec.baseline or None,
        "plan": {x.name: x.weight_bits for x in rec.plan.layers if x.weight_bits != 32},
        "lowering": report["tvm"]["lowering"],
        "size_objective_bytes": objective,
        "size_mb_recorded": rec.size_mb,
        "tvm_weight_bytes": report["tvm"]["weight_bytes"],
        "tvm_constant_bytes": report["tvm"]["constant_bytes"],
        "tvm_file_bytes": report["tvm"]["file_bytes"],
        "fp32_tvm_weight_bytes": f.weight_bytes,
        "onnx_file_bytes": report["onnx"]["file_bytes"],
        "onnx_weight_bytes": report["onnx"]["weight_bytes"],
        "tvm_size_ratio": report["tvm"]["weight_bytes"] / objective,
        "onnx_size_ratio": report["onnx"]["file_bytes"] / objective,
        "packed_ms": t["median_ms"],
        "fp32_ms": t["reference_ms"],
        "packed_vs_fp32_latency": t["relative"],
        "packed_vs_fp32_iqr": t["relative_iqr"],
        "conformance": [c.line() for c in check.conformance],
        "conformance_ok": not check.problems,
        "problems": check.problems,
        "frame_agreement": pairs,
        "export_s": export_s,
        "bundle": str(bundle),
    }


def _plot(rows: list[dict[str, Any]], path: Path, profile: str) -> None:
    """Bytes promised vs delivered per bundle, and the packed library's latency vs float32."""
    from plotly.subplots import make_subplots

    names = [f"#{r['trial']} {r['baseline'] or ''}".strip() for r in rows]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("weights: MB", "packed / float32-weights latency"),
    )
    for key, label in (
        ("size_objective_bytes", "size objective"),
        ("tvm_weight_bytes", "TVM library weights"),
        ("onnx_file_bytes", "model.onnx"),
        ("fp32_tvm_weight_bytes", "float32 library weights"),
    ):
        fig.add_bar(x=names, y=[r[key] / 1e6 for r in rows], name=label, row=1, col=1)
    fig.add_bar(
        x=names,
        y=[r["packed_vs_fp32_latency"] for r in rows],
        error_y={"type": "data", "array": [r["packed_vs_fp32_iqr"] / 2 for r in rows]},
        name="packed / float32 (median of paired rounds, IQR/2)",
        row=1,
        col=2,
    )
    fig.update_layout(title=f"bundles vs the size objective ({profile})", barmode="group")
    fig.write_html(path, include_plotlyjs=True, full_html=True)


def main() -> int:
    ap = parser("artifacts", __doc__, cost_models=True)
    ap.add_argument("--study", default="make-run")
    ap.add_argument("--storage", default="sqlite:///work/search/voxfit.db")
    ap.add_argument("--min-front", type=int, default=3, help="front points asked for")
    ap.add_argument(
        "--front-only",
        dest="all",
        action="store_false",
        help="only the baselines and the front (default: every complete trial)",
    )
    args = ap.parse_args()

    from rich.progress import Progress

    from voxfit.compile import TvmWorker
    from voxfit.search import SearchContext, front, load_study, profile_of, records

    study = load_study(args.storage, args.study)
    profile = profile_of(study)
    ctx = SearchContext.of_study(study, args.work)
    recs = {r.number: r for r in records(study)}
    on_front = [r.number for r in front(list(recs.values()))]
    # the baselines and the front, and (default) every other complete trial too: more plans
    # (infeasible ones included) for the same checks
    wanted = sorted(
        {n for n, r in recs.items() if r.baseline or (args.all and r.complete)} | set(on_front)
    )
    done_path = args.work / "artifacts" / args.study / "rows.json"
    done: dict[str, Any] = json.loads(done_path.read_text()) if done_path.is_file() else {}
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    with TvmWorker(profile.cores) as worker, Progress() as bar:
        task = bar.add_task("bundles", total=len(wanted))
        for n in wanted:
            if str(n) not in done:
                done[str(n)] = _row(
                    ctx, study, trials[n], profile, args.work, args.cost_models, worker
                )
                done_path.parent.mkdir(parents=True, exist_ok=True)
                done_path.write_text(json.dumps(done, indent=1, default=str))
            bar.advance(task)
    rows = [done[str(n)] for n in wanted]
    for r in rows:
        r["on_front"] = r["trial"] in on_front
    result = {
        "study": args.study,
        "profile": profile.name,
        "n_rows": len(rows),
        "n_front": len(on_front),
        "front_note": (
            None
            if len(on_front) >= args.min_front
            else f"the study's front has {len(on_front)} points, fewer than {args.min_front}"
        ),
        "max_tvm_size_ratio": max(r["tvm_size_ratio"] for r in rows),
        "max_onnx_size_ratio": max(r["onnx_size_ratio"] for r in rows),
        "packed_vs_fp32_latency": {str(r["trial"]): r["packed_vs_fp32_latency"] for r in rows},
        "conformance_ok": all(r["conformance_ok"] for r in rows),
        "min_frame_agreement": min(min(r["frame_agreement"].values()) for r in rows),
        "rows": rows,
        "provenance": provenance(cpu=profile.name),
    }
    write_result(args.out, result)
    _plot(rows, args.out.with_suffix(".html"), profile.name)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
