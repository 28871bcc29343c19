"""Int8 that pays: TVM's tensorized int8 base model against its fp32 and onnxruntime's int8.

The base model at 8-bit weights and activations (every conv and linear layer, ``w8a8``;
a depthwise conv keeps float input: no int8 kernel for it) and the fp32 base,
compiled for the profile: the fp32 base as a search compiles it (the shipped database, its
tasks tuned 32 + 96 trials), the int8 convs tensorized with ``voxfit.compile._int8`` and
their tasks tuned ``--trials`` trials (default the same 128) into this benchmark's own
database (``tuning-t<trials>``), timed in ``--rounds`` rounds that alternate TVM fp32, TVM
int8, onnxruntime int8 (its static QDQ of the same layers) and onnxruntime fp32, so the
host's drift cancels in each round's ratios; the keys are medians of the per-round ratios.
Also: the per-kernel time of both TVM builds by layer kind (``rows``), a second calibration
of the int8 plan compiled against the database (``int8_retunes_per_calibration``: tasks it
had to tune), and the int8 output against the fake-quantized torch model. onnxruntime runs
at the profile's ISA (``--peer-isa profile``: on a VNNI host an AVX2 profile's peer gets an
AVX2 CPUID, ``voxfit.latency.restrict_cpuid``), as TVM's code does.

    python benchmarks/int8.py [--checkpoint work/models/.../checkpoint.pt] [--rounds 7]
    python benchmarks/int8.py --pair-safe --out benchmarks/results/int8_pair_safe.json
    python benchmarks/int8.py --checkpoint <a Conformer> --trials 64 \
        --out benchmarks/results/int8_conformer.json

Any model family: a non-TDNN checkpoint works under ``<work>/int8/<profile>/<model class>``.

``--pair-safe`` quantizes the int8 layers' weights so that no pair of products can saturate
``vpmaddubsw``'s int16 (``apply(pair_safe_int8=True)``): the library then computes exactly
the fake-quantized model, at the accuracy cost the ``argmax_agreement`` keys show.

Resumable: the database keeps what was tuned; a rerun measures warm.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from _common import parser, provenance, resolve_profile, restrict_peer, write_result
from voxfit.compile import TvmWorker, compile_model, saturates_int8_pairs
from voxfit.compress import apply, export_onnx, export_onnx_static_int8, ort_session
from voxfit.hw_profiles import HardwareProfile
from voxfit.latency import LatencyResult, TvmLocalEstimator
from voxfit.models import TdnnCtc, build_model, default_config
from voxfit.plan import Candidate, LayerPlan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import N_OUTPUTS, time_ort  # noqa: E402


def _calibration(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 200, 80, generator=g), torch.tensor([200, 150])) for _ in range(2)]


def _w8a8(
    base: nn.Module, multiple: int, seed: int, pair_safe: bool = False, saturation: bool = False
) -> nn.Module:
    s = base.structure()  # type: ignore[operator]

    def act(name: str) -> int:  # grouped (depthwise) convs have no int8 kernel: float input
        layer = base.get_submodule(name)
        return 32 if isinstance(layer, nn.Conv1d) and layer.groups > 1 else 8

    plan = Candidate(layers=tuple(LayerPlan(q, 8, act(q)) for q in s.quantizable))
    return apply(
        base,
        plan,
        channel_multiple=multiple,
        calibration=_calibration(seed),
        pair_safe_int8=pair_safe,
        int8_pair_saturation=saturation,
    )


def _cold_tuning(db: Path, new_tasks: int, tune_s: float) -> dict[str, Any]:
    """What tuning the database cost when it was cold: recorded beside it by the run that
    tuned (``voxfit-bench-tuning.json``), read back by warm runs (None: not recorded)."""
    path = db / "voxfit-bench-tuning.json"
    if new_tasks:
        path.write_text(json.dumps({"tasks": new_tasks, "tune_s": tune_s}))
    if path.exists():
        return dict(json.loads(path.read_text()))
    return {"tasks": None, "tune_s": None}


def _eval_inputs(work: Path, frames: int, n: int = 20) -> list[torch.Tensor]:
    """``n`` windows of ``frames`` real feature frames from the base model's feature cache
    (``<work>/models/features``: spread over its utterances), else random ones."""
    cache = sorted((work / "models" / "features").glob("*.npz"))
    if not cache:
        g = torch.Generator().manual_seed(7)
        return [torch.randn(1, frames, 80, generator=g) for _ in range(n)]
    z = np.load(cache[0])
    feats, offsets = z["frames"], z["offsets"]
    starts = [int(a) for a, b in zip(offsets[:-1], offsets[1:], strict=True) if b - a >= frames]
    picked = starts[:: max(1, len(starts) // n)][:n]
    return [torch.from_numpy(feats[a : a + frames].astype(np.float32))[None] for a in picked]


def _ort_outputs(path: Path, xs: list[torch.Tensor], threads: int) -> list[np.ndarray]:
    sess = ort_session(path, threads=threads)
    lengths = np.array([xs[0].shape[1]], dtype=np.int64)
    return [sess.run(None, {"feats": x.numpy(), "lengths": lengths})[0] for x in xs]


def _kind(kernel: str) -> str:
    """A kernel's layer kind for the per-kind rows."""
    if "quantize" in kernel and "conv" not in kernel:
        return "quantize"
    if "conv1d" in kernel:
        return "conv"
    if "matmul" in kernel:
        return "linear (matmul)"
    return "other (norm, activation, softmax, layout)"


def _per_kind(r: LatencyResult) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for name, ms in r.calls:
        out[_kind(name)] += ms
    return dict(out)


def _per_conv(r: LatencyResult) -> list[float]:
    return [ms for name, ms in r.calls if "conv1d" in name]


def tuning_dir(work: Path, profile: str, trials: int, family: str | None = None) -> Path:
    """The int8 benchmarks' tuning database for ``profile`` at ``trials`` per task:
    ``<work>/int8/<profile>/tuning-t<trials>`` for the TDNN (int8.py, int8_pruned.py and
    search.py's ``--final-trials`` share it, so each tunes only the tasks the others have
    not), under ``<profile>/<family>`` for another model family (its class name)."""
    folder = work / "int8" / profile
    return (folder / family if family else folder) / f"tuning-t{trials}"


def _profile(p: HardwareProfile, db: Path, trials: int) -> HardwareProfile:
    t = replace(p.tuning, database_dir=str(db.resolve()), trials_per_task=trials)
    return replace(p, tuning=t, inputs=p.inputs[:1])


def front_keys(path: Path) -> dict[str, Any]:
    """``front_vs_ort_int8_base`` as the search benchmark measured it (``path``: its result):
    onnxruntime's static int8 of the base / the fastest measured front point within the
    accuracy bounds, median of alternating rounds, and where it came from."""
    got = json.loads(path.read_text())
    peer = got.get("peer")
    if not peer or got.get("front_vs_ort_int8_base") is None:
        raise SystemExit(f"{path}: no peer measurement (run benchmarks/search.py --peer-rounds N)")
    point = got.get("peer_point") or {}
    return {
        "front_vs_ort_int8_base": got["front_vs_ort_int8_base"],
        "front_vs_ort_int8_base_source": {
            "file": str(path),
            "date": (got.get("provenance") or {}).get("date"),
            "rounds": len(peer.get("rounds") or ()),
            "trial": peer.get("best_trial"),
            "plan": point.get("plan"),
            "dev_per_delta": point.get("dev_per_delta"),
            "post_adapt_per_delta": point.get("post_adapt_per_delta"),
            "vs_ort_int8_same_plan": peer.get("vs_ort_int8_same_plan"),
            # the ISA onnxruntime ran at in that search (absent: the host's, before --peer-isa)
            "peer_isa": got.get("peer_isa"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser("int8", __doc__, profile=True, cost_models=True, peer_isa=True)
    ap.add_argument("--checkpoint", type=Path, default=None, help="a trained base (else random)")
    ap.add_argument("--trials", type=int, default=128, help="trials per new int8 task")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--pair-safe",
        action="store_true",
        help="int8 weights no vpmaddubsw pair can saturate with (apply(pair_safe_int8=True))",
    )
    ap.add_argument("--repeats", type=int, default=50, help="onnxruntime timing runs")
    ap.add_argument(
        "--front",
        type=Path,
        default=None,
        help="the search benchmark's result (benchmarks/search.py --peer-rounds N) whose "
        "front_vs_ort_int8_base this file reports",
    )
    ap.add_argument(
        "--front-only",
        action="store_true",
        help="only take the front keys from --front into the existing --out (no timing)",
    )
    args = ap.parse_args(argv)
    console = Console()
    if args.front_only:
        if args.front is None or not args.out.exists():
            ap.error("--front-only needs --front and an existing --out")
        result = {**json.loads(args.out.read_text()), **front_keys(args.front)}
        result.pop("front_vs_ort_int8_base_note", None)  # the note said it was not measured
        write_result(args.out, result)
        console.print(f"front_vs_ort_int8_base: {result['front_vs_ort_int8_base']}")
        return 0
    t_start = time.monotonic()
    profile = resolve_profile(args.profile or "x86-avx2-2core")
    peer_isa = restrict_peer(profile, args.peer_isa)
    frames, threads = profile.primary_input.frames, profile.cores
    torch.set_num_threads(threads)
    if args.checkpoint:
        from voxfit.train import load_checkpoint

        base = load_checkpoint(args.checkpoint).model
    else:
        torch.manual_seed(0)
        base = build_model(default_config("tdnn", N_OUTPUTS, "default")).eval()
    # the TDNN's folder as it always was; another family's under its class name
    family = None if isinstance(base, TdnnCtc) else type(base).__name__
    db = tuning_dir(args.work, profile.name, args.trials, family)
    work = db.parent
    multiple = profile.channel_multiple
    fp32 = apply(base, Candidate(), channel_multiple=multiple)
    int8 = _w8a8(base, multiple, seed=0, pair_safe=args.pair_safe)
    onnx_fp32, onnx_int8 = work / "onnx" / "fp32.onnx", work / "onnx" / "int8.onnx"
    export_onnx(fp32, onnx_fp32)
    export_onnx_static_int8(int8, onnx_int8, _calibration(0))

    prof = _profile(profile, db, args.trials)
    shipped = replace(profile, inputs=profile.inputs[:1])
    fp32_db = None  # the fp32 base runs on the shipped database, untuned beyond it
    fp32_tuning = "the shipped database (the base's tasks: 32 + 96 trials)"
    if not profile.database_dir(args.cost_models).is_dir():  # a profile that ships none
        fp32_db = work / f"tuning-fp32-t{args.trials}"
        shipped = _profile(profile, fp32_db, args.trials)
        fp32_tuning = f"no shipped database: its tasks tuned {args.trials} trials here"
    with (
        TvmLocalEstimator(prof, work / "builds", tuning_dir=db, profile_calls=5) as est_int8,
        TvmLocalEstimator(
            shipped,
            work / "builds-fp32",
            cost_models_dir=args.cost_models,
            tuning_dir=fp32_db,
            tune=fp32_db is not None,
            profile_calls=5,
        ) as est_fp32,
    ):
        console.print("compiling (int8 tasks tune on the first run)")
        (first,) = est_int8.estimate(int8)
        if not first.ok or first.compile is None:
            console.print(f"[red]int8 build failed: {first.error}")
            return 1
        c = first.compile
        cold = _cold_tuning(db, c.new_tasks, c.tune_s)
        console.print(
            f"int8: {c.new_tasks} new tasks tuned in {c.tune_s:.0f} s; {c.lowering}; "
            f"{first.median_ms:.3f} ms"
        )
        # another calibration of the same plan: its tasks must all be in the database now
        (other,) = est_int8.estimate(_w8a8(base, multiple, 1, args.pair_safe))
        retunes = other.compile.new_tasks if other.compile else None
        (s_fp,) = est_fp32.estimate(fp32)
        if not s_fp.ok or s_fp.compile is None:
            console.print(f"[red]fp32 with the shipped database failed: {s_fp.error}")
            return 1
        # tasks the shipped database lacks (run untuned: tune=False); 0 for the base
        shipped_missing = s_fp.compile.new_tasks
        rounds: list[dict[str, float]] = []
        last: dict[str, LatencyResult] = {}
        for i in range(args.rounds):
            (t_fp,) = est_fp32.estimate(fp32)
            (t_i8,) = est_int8.estimate(int8)
            o_i8 = time_ort(onnx_int8, frames, threads, args.repeats)["median_ms"]
            o_fp = time_ort(onnx_fp32, frames, threads, args.repeats)["median_ms"]
            last = {"fp32": t_fp, "int8": t_i8}
            row = {
                "tvm_fp32": t_fp.median_ms or float("nan"),
                "tvm_int8": t_i8.median_ms or float("nan"),
                "ort_int8": o_i8,
                "ort_fp32": o_fp,
            }
            rounds.append(row)
            console.print(
                f"round {i + 1}/{args.rounds}: "
                + ", ".join(f"{k} {v:.3f} ms" for k, v in row.items())
            )

    # accuracy on real features: the int8 library (its tuned, tensorized kernels) against
    # the fake-quantized torch model it compiles and against the fp32 base, and the peer's
    # int8 against the fp32 base, frame by frame
    xs = _eval_inputs(args.work, frames)
    with TvmWorker(1) as w:
        (lib,) = compile_model(int8, prof, w, work / "verify", tune=False, tuning_dir=db)
        tvm_out = [
            w.call("run_local", timeout_s=300, lib=str(lib.lib), input=x.numpy())["output"]
            for x in xs
        ]
    # what a search judges on this profile: the torch model computing the kernels' saturation
    emulated = _w8a8(base, multiple, 0, args.pair_safe, saturates_int8_pairs(profile))
    with torch.no_grad():
        lengths = torch.tensor([frames])
        fq_out = [int8(x, lengths)[0].numpy() for x in xs]
        emu_out = [emulated(x, lengths)[0].numpy() for x in xs]
        fp_out = [fp32(x, lengths)[0].numpy() for x in xs]
    ort_out = _ort_outputs(onnx_int8, xs, threads)
    diff = np.abs(np.stack(tvm_out) - np.stack(fq_out))
    diff_emu = np.abs(np.stack(tvm_out) - np.stack(emu_out))

    def agree(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        return float((np.stack(a).argmax(-1) == np.stack(b).argmax(-1)).mean())

    def med(f: Any) -> float:
        return statistics.median(f(r) for r in rounds)

    kinds_fp = _per_kind(last["fp32"])
    kinds_i8 = _per_kind(last["int8"])
    convs_fp, convs_i8 = _per_conv(last["fp32"]), _per_conv(last["int8"])
    layer_rows = [
        {"kind": k, "tvm_fp32_ms": kinds_fp.get(k, 0.0), "tvm_int8_ms": kinds_i8.get(k, 0.0)}
        for k in sorted(set(kinds_fp) | set(kinds_i8))
    ]
    names = [n for n, _ in last["fp32"].calls if "conv1d" in n]
    conv_rows = [
        {"conv": i, "kernel_fp32": n, "tvm_fp32_ms": f, "tvm_int8_ms": q, "speedup": f / q}
        for i, (n, f, q) in enumerate(zip(names, convs_fp, convs_i8, strict=False))
    ]
    result = {
        "profile": profile.name,
        "profile_hash": profile.stable_hash(),
        "frames": frames,
        "threads": threads,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "pair_safe_int8": args.pair_safe,
        "int8_trials_per_task": args.trials,
        "model": type(base).__name__,
        "fp32_tuning": fp32_tuning,
        "tvm_int8_vs_fp32": med(lambda r: r["tvm_fp32"] / r["tvm_int8"]),
        "tvm_int8_vs_ort_int8": med(lambda r: r["tvm_int8"] / r["ort_int8"]),
        "ort_int8_vs_fp32": med(lambda r: r["ort_fp32"] / r["ort_int8"]),
        "tvm_fp32_vs_ort_fp32": med(lambda r: r["tvm_fp32"] / r["ort_fp32"]),
        **(front_keys(args.front) if args.front else {"front_vs_ort_int8_base": None}),
        "int8_retunes_per_calibration": retunes,
        "fp32_tasks_missing_from_shipped_db": shipped_missing,
        "int8_lowering": c.lowering,
        # the cold run's tuning (this run's when it tuned, else the database's first run's)
        "int8_cold_tuned_tasks": cold["tasks"],
        "int8_cold_tune_s": cold["tune_s"],
        "accuracy_inputs": f"{len(xs)} x {frames} frames",
        "verify_tasks_untuned": lib.new_tasks,
        "int8_vs_fake_quant_max_abs": float(diff.max()),
        "int8_vs_fake_quant_mean_abs": float(diff.mean()),
        # apply(int8_pair_saturation=saturates_int8_pairs(profile)): what the search scores
        "search_model_saturates_pairs": saturates_int8_pairs(profile),
        "int8_vs_search_model_max_abs": float(diff_emu.max()),
        "int8_vs_search_model_mean_abs": float(diff_emu.mean()),
        # frames whose most likely label is the same
        "argmax_agreement": {
            "tvm_int8_vs_fake_quant": agree(tvm_out, fq_out),
            "tvm_int8_vs_fp32": agree(tvm_out, fp_out),
            "fake_quant_vs_fp32": agree(fq_out, fp_out),
            "tvm_int8_vs_search_model": agree(tvm_out, emu_out),
            "search_model_vs_fp32": agree(emu_out, fp_out),
            "ort_int8_vs_fp32": agree(ort_out, fp_out),
        },
        "rounds_ms": rounds,
        "rows": layer_rows,
        "conv_rows": conv_rows,
        # the ISA onnxruntime ran at (--peer-isa): the CPU features hidden from it
        "peer_isa": peer_isa,
        "provenance": provenance({"torch": torch.__version__}, wall_s=time.monotonic() - t_start),
    }
    write_result(args.out, result)
    for k in ("tvm_int8_vs_fp32", "tvm_int8_vs_ort_int8", "ort_int8_vs_fp32"):
        console.print(f"{k}: {result[k]:.3f}")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
