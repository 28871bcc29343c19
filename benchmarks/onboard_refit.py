"""Is the transfer limited by its source? Refit the x86 source on packed-weight libraries and
transfer again, on the measurements already stored (no new timing).

The shipped ``x86-avx2-2core`` model learned float32-weight libraries; since weights are
packed in the library, its per-task predictions miss what unpacking costs. This refits it on
the candidates ``voxfit cost-model collect`` measured since packing (rows that record their
lowering, in ``<work>/measurements/x86-avx2-2core``), reports its own held-out figures
(25% of them), then re-fits the no-AVX device's transfer from it on the same 20 samples and
judges it on the same 50 held-out candidates as ``benchmarks/onboard.py`` (its store under
``--bench-work``), and the same host's calibration on the sibling candidates. Writes
``benchmarks/results/onboard_refit.json``.

    voxfit cost-model collect --profile x86-avx2-2core --n 200 --levelled 100 --seed 11 \\
        --checkpoint work/models/<base>/checkpoint.pt --work work
    python benchmarks/onboard_refit.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import RESULTS, provenance
from voxfit.cost_models import evaluate, fit, load_dataset, metrics, split
from voxfit.cost_models._onboard import labelled, split_candidates
from voxfit.cost_models._transfer import fit_transfer
from voxfit.hw_profiles import describe_host, find_profile, load_profile
from voxfit.spaces import find_space
from voxfit.train import load_checkpoint

KEYS = ("within_10pct", "spearman", "mape", "n")


def _short(m: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(m[k]), 3) for k in KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("work"))
    ap.add_argument("--bench-work", type=Path, default=Path("work/onboard-bench"))
    ap.add_argument(
        "--checkpoint", type=Path, default=Path("work/models/tdnn-d9381586fb1b/checkpoint.pt")
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "onboard_refit.json")
    args = ap.parse_args()
    prof = load_profile(find_profile("x86-avx2-2core"))
    models, tasks = load_dataset(args.work / "measurements" / prof.name)
    packed = models[
        (models["source"] == "collect") & models["lowering"].notna() & models["relative"].notna()
    ]
    t = tasks[tasks["cand"].isin(set(packed["cand"]))]
    train, test = split(packed, 0.25, 0)
    cm = fit(packed[packed.cand.isin(train)], t[t.cand.isin(train)], prof)
    own, _ = evaluate(cm, packed[packed.cand.isin(test)], t[t.cand.isin(test)], prof)
    src = fit(packed, t, prof)  # the source: every packed candidate

    base = load_checkpoint(args.checkpoint).model.eval()
    space = find_space("tdnn-default").bind(base.structure())
    sse = load_profile(find_profile("x86-64-sse-rpc"))
    store = args.bench_work / "measurements" / sse.name
    shots, held = split_candidates(space, 20, 50, 0)
    shot_rows, _ = labelled(store, shots, "utterance_1s")
    held_rows, _ = labelled(store, held, "utterance_1s")
    tm = fit_transfer(src, shot_rows, sse)
    ys = [y for _, y in held_rows]
    sse_m = metrics([tm.predict_tasks(x).ms for x, _ in held_rows], ys)

    sib = args.bench_work / "measurements" / prof.name
    s_shots, fresh = split_candidates(space, 20, 30, 77)
    s_rows, ref = labelled(sib, s_shots, "utterance_1s")
    f_rows, _ = labelled(sib, fresh, "utterance_1s")
    cal = fit_transfer(src, s_rows, prof, reference_ms=ref)
    fys = [y for _, y in f_rows]
    same_host = metrics([cal.predict_tasks(x).ms for x, _ in f_rows], fys)

    out = {
        "n_source_candidates": len(packed),
        "source_heldout": _short(own),
        "sse_transfer_from_refit": _short(sse_m),
        "same_host_calibrated_from_refit": _short(same_host),
        "provenance": provenance(host=describe_host().as_dict(), checkpoint=str(args.checkpoint)),
    }
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "provenance"}, indent=1))


if __name__ == "__main__":
    main()
