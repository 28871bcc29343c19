"""Deployable bundles of chosen trials, and their verification.

A bundle is a folder a deployment team can take as is:

- ``plan.yaml``: the per-layer plan (schema-versioned) the model was made from;
- ``model.onnx``: the compressed model (int8 QDQ where the plan has 8-bit layers), checked
  by onnx.checker and run by onnxruntime against torch;
- ``tvm/<input>.so``: the TVM library for the profile's target (cross-linked for Arm), and
  ``tvm/load_example.py``, a minimal loader;
- ``adapters.npz``: the adapter weights per slot (no pickle), the starting point of each
  user's on-device adaptation, and ``adapters.md``: how a device trains them (arrays,
  loss, steps, learning rate) and the trainable state per user in bytes;
- ``frontend.json`` + ``frontend.py`` (numpy only): the log-mel front end and the model's
  input/output layouts; ``phones.json``: index -> phone, the blank; ``decode.py`` (numpy
  only): greedy CTC to phones; ``conformance/``: a wav, its features, the plan's torch
  output and phones, with tolerances (see ``_bundle_describe``);
- ``report.json``: every metric, per-speaker PER before/after adaptation, latency with its
  provenance (measured or predicted, TVM version, target, repeats), the checks above;
- ``manifest.json``: sha256 and size of every other file. ``voxfit verify`` checks it and
  reruns the conformance pair (front end, onnxruntime, the TVM library where it runs here);
- ``manifest.sig`` (``voxfit export --sign-key``): an ed25519 signature of manifest.json,
  checked by ``voxfit verify --key`` (see ``_signing``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from torch import nn

from voxfit._config import read_user_text
from voxfit.errors import ConfigError, VoxfitError
from voxfit.hw_profiles import HardwareProfile
from voxfit.models import n_mels_of
from voxfit.plan import Candidate
from voxfit.search._audit import AuditLog
from voxfit.search._bundle_describe import (
    ConformanceCheck,
    check_conformance,
    write_self_description,
)
from voxfit.search._context import SearchContext
from voxfit.search._record import record_of
from voxfit.search._signing import SIGNATURE, fingerprint, sign_bundle, signature_problems

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BUNDLE_SCHEMA_VERSION = 2  # 2: self-describing (front end, phones, conformance)

_LOADER = '''"""Load and run the voxfit TVM library of this bundle (TVM {tvm} runtime).

    python load_example.py {lib}
"""

import os
import sys

# the threads this bundle's latency was measured with (the profile's cores), unless set:
# TVM's own default can be fewer (1 on a 2-core AMD EPYC VM, where it ran 2x slower)
os.environ.setdefault("TVM_NUM_THREADS", "{threads}")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

lib = sys.argv[1] if len(sys.argv) > 1 else "{lib}"
dev = tvm.cpu(0)  # tvm.cuda(0) for a cuda target; over RPC: remote.load_module(...)
vm = relax.VirtualMachine(tvm.runtime.load_module(lib), dev)
feats = np.zeros((1, {frames}, {n_mels}), dtype="float32")  # (batch, frames, log-mel bins)
out = vm["main"](tvm.runtime.tensor(feats, dev))
log_probs = (out[0] if not hasattr(out, "numpy") else out).numpy()
print("log-probs", log_probs.shape)  # (1, frames // 2, phones + blank)
'''


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(bundle: Path) -> Path:
    files = sorted(
        p
        for p in bundle.rglob("*")
        if p.is_file() and p.name != MANIFEST and p != bundle / SIGNATURE
    )
    entries = {
        str(p.relative_to(bundle)): {"sha256": sha256_of(p), "bytes": p.stat().st_size}
        for p in files
    }
    out = bundle / MANIFEST
    out.write_text(
        json.dumps({"schema_version": BUNDLE_SCHEMA_VERSION, "files": entries}, indent=2) + "\n"
    )
    return out


@dataclass(frozen=True, slots=True)
class BundleCheck:
    """What :func:`check_bundle` found: one line per problem (empty: the bundle is intact
    and conforms), and each runtime's result on the conformance pair."""

    problems: list[str]
    conformance: list[ConformanceCheck]


def verify_bundle(
    bundle: str | Path, *, run_models: bool = True, key: str | Path | None = None
) -> list[str]:
    """Problems found (empty when the bundle is intact): missing, changed or unlisted files,
    (``run_models``) a runtime that does not reproduce the conformance pair, and (``key``)
    a missing or invalid signature by that public key."""
    return check_bundle(bundle, run_models=run_models, key=key).problems


def check_bundle(
    bundle: str | Path, *, run_models: bool = True, key: str | Path | None = None
) -> BundleCheck:
    """:func:`verify_bundle` with each runtime's conformance figures.

    ``key``: a public key (``signing.pub``); the bundle must then carry ``manifest.sig``, a
    valid signature of its manifest by that key (checked first).

    Files: every file listed in manifest.json exists with its sha256, none is unlisted.
    Models (bundles with ``conformance/``): ``frontend.py`` recomputes ``input.npy`` from
    ``audio.wav``; onnxruntime and, where the profile's target runs on this machine, the
    TVM library reproduce ``expected_log_probs.npy`` within ``expected.json``'s tolerances.
    """
    b = Path(bundle)
    problems = signature_problems(b, key) if key is not None else []
    problems += _file_problems(b)
    checks = check_conformance(b) if run_models and b.is_dir() else []
    problems += [c.line() for c in checks if c.error]
    return BundleCheck(problems, checks)


def _file_problems(b: Path) -> list[str]:
    m = b / MANIFEST
    if not m.exists():
        return [f"{m}: missing"]
    try:
        _, text = read_user_text(m, max_bytes=None)
        data = json.loads(text)
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise TypeError("'files' is not a mapping of file -> {sha256: ...}")
    except VoxfitError as e:
        return [str(e)]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        return [f"{m}: unreadable ({type(e).__name__}: {str(e)[:200]})"]
    problems = []
    for rel, meta in files.items():
        p = b / rel
        if not p.resolve().is_relative_to(b.resolve()):
            problems.append(f"{rel}: outside the bundle")
        elif not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_of(p) != meta.get("sha256"):
            problems.append(f"{rel}: sha256 differs from {MANIFEST}")
    listed = set(files)
    for p in b.rglob("*"):
        rel = str(p.relative_to(b))
        if p.is_file() and p.name != MANIFEST and rel != SIGNATURE and rel not in listed:
            problems.append(f"{rel}: not listed in {MANIFEST}")
    return problems


def _adapter_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    from voxfit.models import Adapter

    out = {}
    for path, m in model.named_modules():
        if isinstance(m, Adapter):
            for name, p in m.named_parameters():
                out[f"{path}.{name}"] = p.detach().cpu().numpy()
    return out


def _onnx_check(model: nn.Module, path: Path, frames: int) -> dict[str, Any]:
    """model.onnx against the plan's torch model (its fake quantization on: what the
    search's accuracy measured), run by onnxruntime as deployed (every optimization, the
    session config the bundle states)."""
    from voxfit.compress import ort_session

    x = torch.randn(1, frames, n_mels_of(model), generator=torch.Generator().manual_seed(0))
    n = torch.tensor([frames])
    with torch.no_grad():
        ref, _ = model(x, n)
    sess = ort_session(path)  # as frontend.json's onnxruntime entry says to run it
    got = sess.run(None, {"feats": x.numpy(), "lengths": n.numpy()})[0]
    diff = float(np.max(np.abs(got - ref.numpy())))
    agree = float(np.mean(got.argmax(-1) == ref.numpy().argmax(-1)))
    return {
        "reference": "torch model of the plan (fake quantization on)",
        "max_abs_diff": diff,
        "argmax_agreement": agree,
        "frames": frames,
    }


def export_bundle(
    ctx: SearchContext,
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    profile: HardwareProfile,
    out_dir: str | Path,
    *,
    cost_models_dir: str | Path = "cost_models",
    tuning_dir: str | Path | None = None,
    worker: Any = None,
    audit: AuditLog | None = None,
    sign_key: Any = None,
    polish_steps: int = 0,
) -> Path:
    """Write the bundle of one completed trial under ``out_dir/trial-<n>/``.

    ``tuning_dir``: the user's tuning database (``voxfit.compile.default_tuning_dir`` of
    the work folder, shared with the search); default: beside ``out_dir``, never inside a
    bundle.

    ``audit``: the study's audit log, which gets a ``bundle_exported`` event (with the
    manifest's sha256); ``sign_key``: an ed25519 private key (``load_private_key``) that
    signs the manifest and that event's chain head into ``manifest.sig``.

    The model is rebuilt from the trial's plan and seed (same data, same recovery steps),
    its dev PER re-measured and compared with the trial's record.

    ``polish_steps``: a candidate the search inherited from an elastic base (no
    distillation) is fine-tuned that many distillation steps from the base before export,
    and the polished model is exported only if its dev PER beats the trial's (the report's
    ``polish`` says which, with both figures; the plan in the bundle is the one exported).

    Raises:
        ConfigError: the trial is not complete or was made for another profile.
    """
    from voxfit.compile import compile_model, saturates_int8_pairs
    from voxfit.compress import export_onnx, fake_quant_off

    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise ConfigError(f"trial {trial.number} is {trial.state.name}, not COMPLETE")
    made_for = study.user_attrs.get("profile", {}).get("name")
    if made_for and made_for != profile.name:
        raise ConfigError(f"study was searched for {made_for}, not {profile.name}")
    t0 = time.monotonic()
    rec = record_of(trial)
    if rec.plan is None or rec.seed is None:
        raise ConfigError(f"trial {trial.number} records no plan and seed to rebuild from")
    cand = rec.plan
    _check_polish(ctx, trial.number, cand, polish_steps)
    searched_dev = rec.accuracy.dev_per
    if polish_steps and searched_dev is None:
        raise ConfigError(f"trial {trial.number} records no dev PER to judge a polish by")
    bundle = Path(out_dir) / f"trial-{trial.number}"
    tmp = bundle.with_name(bundle.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from voxfit.metrics import phone_error_rate

    model, cand, polish = build_for_export(
        ctx,
        cand,
        rec.seed,
        profile.channel_multiple,
        saturates_int8_pairs(profile),
        polish_steps=polish_steps,
        searched_dev_per=searched_dev if searched_dev is not None else float("nan"),
        dev_per=lambda m: phone_error_rate(m, ctx.manifest.split("dev"), ctx.store, ctx.inventory),
    )
    if polish is not None:
        log.info(
            "trial %d polished %d steps: dev PER %.2f -> %.2f (%s)",
            trial.number, polish_steps, polish["dev_per_inherited"], polish["dev_per_polished"],
            "exported" if polish["used"] else "not better: the inherited candidate is exported",
        )  # fmt: skip
    (tmp / "plan.yaml").write_text(cand.dump_yaml())

    onnx_info = export_onnx(model, tmp / "model.onnx")
    onnx_check = _onnx_check(model, tmp / "model.onnx", profile.primary_input.frames)

    spec = profile.primary_input
    tvm_info: dict[str, Any] = {"target": profile.target, "input": spec.name}
    from voxfit.compile import runner_spec

    runner_kind = runner_spec(profile).kind
    own = worker is None
    if own:
        from voxfit.compile import TvmWorker

        worker = TvmWorker(profile.cores)
    try:
        (c,) = compile_model(
            model,
            profile,
            worker,
            tmp / "tvm" / "build",
            inputs=(spec,),
            cost_models_dir=cost_models_dir,
            tuning_dir=tuning_dir or Path(out_dir).parent / "tuning" / profile.name,
            export=True,
        )
        if not c.ok or c.lib is None:
            raise VoxfitError(f"TVM build for the bundle failed: {c.error}")
        # whether the build made int8 compute of the int8 convs (else they run in float32)
        int8_compute = (c.details.get("int8") or {}).get("compute") == "int8"
        lib = tmp / "tvm" / f"{spec.name}.so"
        shutil.move(str(c.lib), lib)
        shutil.rmtree(tmp / "tvm" / "build", ignore_errors=True)
        tvm_info.update(
            lib=str(lib.relative_to(tmp)),
            new_tasks=c.new_tasks,
            lowering=c.lowering,
            # the weights as the library stores them (packed where the plan quantized them)
            weight_bytes=c.weight_bytes,
            constant_bytes=c.details.get("constant_bytes"),
            file_bytes=lib.stat().st_size,
            # whose schedules the library runs: tuned for this profile (measured on its
            # device, locally or over RPC), or a seed profile's (tuning.seed_from)
            tuning={
                "tasks": c.n_tasks,
                "tuned_for_this_device": c.n_tasks - len(c.details.get("seeded_tasks", [])),
                "seeded_from": profile.tuning.seed_from,
                "seeded_tasks": list(c.details.get("seeded_tasks", [])),
                # of the tuned ones: the seed's schedules, timed on this device in this build
                "seed_measured_here": list(c.details.get("seed_measured_tasks", [])),
                "measured_by": c.details.get("tuner") or runner_kind,
            },
        )
        from voxfit.hw_profiles import host_runs

        if host_runs(profile)[0] and not profile.cross_compiler:
            shape = (1, spec.frames, n_mels_of(model))
            x = np.random.default_rng(0).standard_normal(shape).astype("float32")
            r = worker.call("run_local", timeout_s=300, lib=str(lib.resolve()), input=x)
            if "error" in r:
                raise VoxfitError(f"the bundle's TVM library does not run: {r['error']}")
            with torch.no_grad(), fake_quant_off(model):
                ref, _ = model(torch.from_numpy(x), torch.tensor([spec.frames]))
            tvm_info["max_abs_diff_vs_torch"] = float(np.max(np.abs(r["output"] - ref.numpy())))
    finally:
        if own:
            worker.close()
    (tmp / "tvm" / "load_example.py").write_text(
        _LOADER.format(
            tvm=_tvm_version(),
            lib=f"{spec.name}.so",
            frames=spec.frames,
            n_mels=n_mels_of(model),
            threads=profile.cores,
        )
    )
    arrays = _adapter_arrays(model)
    np.savez(tmp / "adapters.npz", **arrays)  # type: ignore[arg-type]
    described = write_self_description(
        tmp,
        model,
        cand=cand,
        inventory=ctx.inventory,
        feature_cfg=ctx.store.cfg,
        frames=spec.frames,
        adapters=arrays,
        adapt=ctx.adapt,
        tvm_unrounded=_tvm_unrounded(model, cand, int8_compute),
    )

    if polish is not None and polish["used"]:  # measured on this very model
        dev = polish["dev_per_polished"]
    else:
        dev = phone_error_rate(model, ctx.manifest.split("dev"), ctx.store, ctx.inventory)
    report = {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "study": study.study_name,
        "trial": trial.number,
        "baseline": rec.baseline or None,
        "plan_hash": cand.stable_hash(),
        "objectives": dict(
            zip(study.user_attrs.get("objectives", []), trial.values, strict=False)
        ),
        "metrics": {
            "dev_per": rec.accuracy.dev_per,
            "post_adapt_per": rec.accuracy.post_adapt_per,
            "pre_adapt_per": rec.accuracy.pre_adapt_per,
            "adapt_gain": rec.accuracy.adapt_gain,
            "size_mb": rec.size_mb,
            "params": rec.params,
            "peak_memory_mb": rec.peak_memory_mb,
        },
        "dev_per_rebuilt": dev,
        "polish": polish,
        "per_speaker": {
            "note": "PER % [before, after] adapting to each held-out speaker "
            f"({rec.accuracy.adaptation} settings)",
            "speakers": {k: list(v) for k, v in rec.accuracy.per_speaker.items()},
        },
        "latency": dataclasses.asdict(rec.latency),
        "constraints": {
            "latency_budget_ms": profile.latency_budget_ms,
            "memory_budget_mb": profile.memory_budget_mb,
            "values": list(rec.constraints) if rec.constraints is not None else None,
        },
        "base": study.user_attrs.get("base"),
        "profile": {"name": profile.name, "hash": profile.stable_hash(), "target": profile.target},
        "onnx": {
            "file": "model.onnx",
            "opset": onnx_info.opset,
            "int8_layers": list(onnx_info.int8_layers),
            "int4_layers": list(onnx_info.int4_layers),
            "float16_layers": list(onnx_info.float16_layers),
            "act8_layers": list(onnx_info.act8_layers),
            "act16_layers": list(onnx_info.act16_layers),
            "qdq_nodes": onnx_info.qdq_nodes,
            "weight_bytes": onnx_info.weight_bytes,
            "file_bytes": (tmp / "model.onnx").stat().st_size,
            "checker": "passed",
            **onnx_check,
        },
        "tvm": tvm_info,
        "adapters": {
            "file": "adapters.npz",
            "arrays": {k: list(v.shape) for k, v in arrays.items()},
            "kinds": {a.slot: a.kind for a in cand.adapters},
            "notes": "adapters.md",
            **described["adapter_state"],
        },
        "self_description": {
            "files": described["files"],
            "conformance": described["conformance"],
        },
        "seed": rec.seed,
        "record_version": rec.version,
        "checkpoint": study.user_attrs.get("checkpoint"),
        "versions": study.user_attrs.get("versions"),
        "export_s": time.monotonic() - t0,
    }
    (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_manifest(tmp)
    head = None
    if audit is not None:
        signer = fingerprint(sign_key) if sign_key is not None else None
        digest = sha256_of(tmp / MANIFEST)
        plan_hash = cand.stable_hash()
        entry = audit.bundle_exported(trial.number, plan_hash, bundle.name, digest, signer)
        head = {"study": audit.study, "seq": entry["seq"], "hash": entry["hash"]}
    if sign_key is not None:
        sign_bundle(tmp, sign_key, audit_head=head)
    shutil.rmtree(bundle, ignore_errors=True)
    tmp.rename(bundle)
    return bundle


def _tvm_unrounded(model: nn.Module, cand: Candidate, int8_compute: bool) -> list[str]:
    """Layers with quantized activations the TVM library computes in float32 without
    rounding their input: all but the int8 layers, and those too unless the build made int8
    compute of them (``int8_compute``)."""
    from voxfit.compile import int8_layers

    rounded = set(int8_layers(model)) if int8_compute else set()
    return [x.name for x in cand.layers if x.act_bits < 32 and x.name not in rounded]


def build_for_export(
    ctx: SearchContext,
    cand: Candidate,
    seed: int,
    channel_multiple: int,
    saturation: bool,
    *,
    polish_steps: int,
    searched_dev_per: float,
    dev_per: Callable[[nn.Module], float],
) -> tuple[nn.Module, Candidate, dict[str, Any] | None]:
    """The model a bundle exports, its plan, and what polishing did (None: not asked).

    With ``polish_steps`` the candidate is rebuilt with that many recovery steps and kept
    only if ``dev_per`` of it beats ``searched_dev_per`` (the trial's record); otherwise the
    searched (inherited) candidate is rebuilt as it was."""
    if not polish_steps:
        return ctx.build(cand, channel_multiple, seed, int8_pair_saturation=saturation), cand, None
    polished = replace(cand, recovery_steps=polish_steps)
    t0 = time.monotonic()
    model = ctx.build(polished, channel_multiple, seed, int8_pair_saturation=saturation)
    dev_polished = dev_per(model)
    used = dev_polished < searched_dev_per
    polish = {
        "steps": polish_steps,
        "used": used,
        "dev_per_inherited": searched_dev_per,
        "dev_per_polished": dev_polished,
        "searched_plan_hash": cand.stable_hash(),
        "polish_s": time.monotonic() - t0,
        "note": "the trial's other metrics (adaptation, latency) are the inherited "
        "candidate's, as searched",
    }
    if used:
        return model, polished, polish
    model = ctx.build(cand, channel_multiple, seed, int8_pair_saturation=saturation)
    return model, cand, polish


def _check_polish(ctx: SearchContext, number: int, cand: Candidate, steps: int) -> None:
    """``polish_steps`` applies to candidates inherited from an elastic base."""
    from voxfit.compress import elastic_widths

    if not steps:
        return
    if steps < 0:
        raise ConfigError(f"--polish-steps: {steps} is negative")
    if not elastic_widths(ctx.base):
        raise ConfigError(
            f"--polish-steps: the study's base {ctx.checkpoint} is not elastic (voxfit train "
            "--elastic): its candidates are distilled by the search already"
        )
    if cand.recovery_steps:
        raise ConfigError(
            f"--polish-steps: trial {number} was distilled already ({cand.recovery_steps} steps)"
        )
    if ctx.recovery is None:
        raise ConfigError("--polish-steps: the search context has no training data to distil on")


def _tvm_version() -> str:
    import importlib.metadata as md

    return md.version("apache-tvm")
