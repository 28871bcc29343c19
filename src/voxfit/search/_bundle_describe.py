"""What a bundle says about itself, and the check that it computes what it says.

Written beside the model files by :func:`export_bundle`:

- ``frontend.json``: every log-mel setting (``voxfit.data.frontend_spec``) plus the model's
  input and output layouts; ``frontend.py``: a numpy-only implementation reading it;
- ``phones.json``: index -> phone symbol of every output, the blank's index;
- ``conformance/``: a 16 kHz synthetic test signal (harmonics on a gliding pitch, a few
  seconds of no speech: bundles carry no recording and no per-utterance text), its
  features (``input.npy``, ``input_lengths.npy``), the plan's torch model's output on them
  (fake quantization on: what the search measured) and its greedy decoding
  (``expected.json``, with the tolerances); ``decode.py``: a numpy-only greedy CTC decoder;
- ``adapters.md``: how a device trains the adapters, and the trainable state per user.

:func:`check_conformance` reruns the pair through the bundle's own files: the front end
(``python -I frontend.py``), onnxruntime (``model.onnx``) and, where the target runs on this
machine, the TVM library (in a TVM worker process).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voxfit.compress import ORT_SESSION_CONFIG
from voxfit.data import FeatureConfig, PhoneInventory
from voxfit.plan import Candidate

CONFORMANCE_SCHEMA_VERSION = 1
# A runtime conforms when its argmax class equals the reference's on >= 99% of the valid
# output frames and no valid output differs by more than the tolerance. Float activations:
# runtimes differ only in summation order (measured ~1e-5), so every log-prob is held to
# 1e-3. Quantized activations: a runtime's float arithmetic differs a little from torch's
# (onnxruntime runs the BatchNorm folded into the conv), so a value near a rounding
# boundary lands one step apart, and the flips spread layer by layer -- measured on a
# make-run bundle (2026-12-04, trial 17, onnxruntime with every graph optimization off):
# 0.008% of the first quantized layer's inputs one step off, 0.7% four layers later; the
# log-probs then differ by 0.03 (median) to 0.15, largest where a class is unlikely
# (log-prob < -5), while the posteriors differ by at most 0.016. So for those plans the
# bound is on the posteriors (what a decoder uses), MAX_PROB_DIFF_ACT_QUANT; a broken
# export (wrong weights, layout, a lost adapter) moves posteriors by tenths and argmaxes.
# Bundles written before this rule hold ``max_abs_diff`` 0.1 (log-prob) and keep it.
MIN_FRAME_AGREEMENT = 0.99
DEFAULT_REF = "expected_log_probs.npy"
MAX_ABS_DIFF = 1e-3
MAX_ABS_DIFF_ACT_QUANT = 0.1
MAX_PROB_DIFF_ACT_QUANT = 0.05
# The numpy front end against voxfit's torch one (measured ~1e-5: float64 vs float32).
FEATURES_MAX_ABS_DIFF = 1e-4

_SELF = Path(__file__).parent


def _write_wav(path: Path, pcm: np.ndarray, rate_hz: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate_hz)
        w.writeframes(pcm.astype("<i2").tobytes())


def _conformance_audio(cfg: FeatureConfig, frames: int) -> np.ndarray:
    """int16 PCM of exactly ``frames`` feature frames: a deterministic synthetic signal,
    not speech (bundles never carry a recording): harmonics up to 7 kHz on a pitch gliding
    100-250 Hz, amplitude-modulated at 4 Hz, with seeded noise, so every mel band holds
    energy (a near-silent band's log would magnify float rounding) and the per-utterance
    normalization sees a varied input."""
    n = (frames - 1) * cfg.hop_samples  # n_frames = 1 + n // hop
    t = np.arange(n) / cfg.sample_rate_hz
    f0 = 100.0 + 150.0 * (0.5 - 0.5 * np.cos(2 * np.pi * t / max(t[-1], 1e-3)))
    phase = 2 * np.pi * np.cumsum(f0) / cfg.sample_rate_hz
    x = sum(np.sin(k * phase) / np.sqrt(k) for k in range(1, 71) if k * 250.0 < 7000.0)
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 4.0 * t))
    x = x + 0.1 * np.random.default_rng(0).standard_normal(n)
    return np.round(x / np.abs(x).max() * 0.5 * 32767).astype(np.int16)


def _adapters_md(
    arrays: dict[str, np.ndarray], kinds: Mapping[str, str], adapt: Any, state: dict[str, int]
) -> str:
    rows = "\n".join(
        f"| `{k}` | {' x '.join(map(str, v.shape))} | float32 |" for k, v in arrays.items()
    )
    if not arrays:
        rows = "| (none: this plan has no adapters, nothing trains on the device) | | |"
    kind_lines = "\n".join(f"- `{s}`: {k}" for s, k in sorted(kinds.items())) or "- none"
    return f"""# Adapters: the part a device trains

The backbone (everything in `model.onnx` / `tvm/*.so`) is frozen and stays packed. Each user
personalizes the model by training only the small float32 adapters stored in `adapters.npz`
(numpy `.npz`, no pickle). They start as the identity (every `up` is zero), so the shipped
model computes the same thing with or without them.

## Slots and kinds
{kind_lines}

- *residual* at block `blocks.i`: the block output `x` (channels x frames) becomes
  `x + up.weight @ relu(down.weight @ x + down.bias) + up.bias`, per frame.
- *lora* on layer `L` (`blocks.i.<layer>.lora`): `L(x) + up.weight @ (down.weight @ x)`.
- *merged_lora* on layer `L` (`blocks.i.<layer>.lora`): `L` computed with the weight
  `Q(W + up.weight @ down.weight)`, where `W` is `L`'s shipped (dequantized) weight and `Q`
  rounds it back onto `L`'s own grid (per output channel, symmetric, at the plan's bits for
  `L`, the scale recomputed from the merged rows). Train it with that forward and pass
  gradients straight through `Q`. A user's model is the backbone with `L`'s weight replaced
  by `Q(W + up @ down)`: export or rebuild it so (same shapes, so the same tuned kernels),
  and nothing runs beside it: an int8 layer stays int8 and runs as fast as shipped.

## Arrays in adapters.npz
| array | shape | dtype |
|---|---|---|
{rows}

## Trainable state per user
- adapter weights: **{state["adapter_bytes"]} bytes** (what a device stores per user)
- while training with Adam: weights + gradients + two moments =
  **{state["training_state_bytes"]} bytes**

## How voxfit adapts (what its accuracy figures assume)
- loss: CTC (blank index from `phones.json`), targets = the user's phone sequences;
- optimizer: Adam, learning rate {adapt.lr}, {adapt.steps} steps, batches of at most
  {adapt.max_batch_s} s of audio, shuffled with seed {adapt.seed};
- the backbone in inference mode (BatchNorm statistics frozen, no dropout);
- features from `frontend.py`, exactly as at inference.

## On a device (pseudo-code)
```
adapters = load_npz("adapters.npz")           # the user's copy; float32
m, v = zeros_like(adapters), zeros_like(adapters)
for step in 1..{adapt.steps}:
    feats, phones = next_batch(user_recordings)  # frontend.py, phones.json indices
    log_probs, cache = forward(backbone, adapters, feats)     # backbone frozen
    loss = ctc_loss(log_probs, phones, blank=0)
    grads = backward(cache, d loss / d log_probs)  # only adapter arrays get gradients
    for k in adapters:                              # Adam, lr={adapt.lr}
        m[k] = 0.9 * m[k] + 0.1 * grads[k]
        v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
        m_hat, v_hat = m[k] / (1 - 0.9**step), v[k] / (1 - 0.999**step)
        adapters[k] -= {adapt.lr} * m_hat / (sqrt(v_hat) + 1e-8)
save_npz("adapters.npz", adapters)            # {state["adapter_bytes"]} bytes for this user
```
The compiled libraries take no adapter inputs: a device that trains adapters runs them
beside the frozen backbone (or rebuilds the model with the trained arrays); *merged_lora*
adapters are always folded into their layer's weight (above) and rebuilt.
"""


def adapter_state(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """Bytes per user: the adapter weights, and weights + grads + Adam moments (4x)."""
    weights = int(sum(a.size for a in arrays.values())) * 4  # trained and stored in float32
    return {
        "adapter_parameters": int(sum(a.size for a in arrays.values())),
        "adapter_bytes": weights,
        "training_state_bytes": 4 * weights,
    }


def write_self_description(
    out: Path,
    model: nn.Module,
    *,
    cand: Candidate,
    inventory: PhoneInventory,
    feature_cfg: FeatureConfig,
    frames: int,
    adapters: dict[str, np.ndarray],
    adapt: Any,
    tvm_unrounded: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the files above into ``out``; returns the report's ``self_description``.

    ``tvm_unrounded``: layers with quantized activations that the TVM library computes in
    float32 without rounding its input (``lowering``: "run dequantized in float32"). Where a
    runtime computes something other than the plan's torch model, the pair says so with a
    reference of its own (``expected.json``'s ``references``): onnxruntime's int8 does not
    saturate ``vpmaddubsw``'s int16 pairs, and TVM does not round those layers' inputs."""
    from voxfit.data import frontend_reference_source, frontend_spec, log_mel
    from voxfit.metrics import greedy_decode
    from voxfit.models import OUTPUT_LENGTHS, OUTPUT_STRIDE

    fe = frontend_spec(feature_cfg)
    fe["model_input"] = {
        "feats": {
            "shape": ["batch", "frames", feature_cfg.n_mels],
            "dtype": "float32",
            "meaning": "the front end's output, frames of every utterance padded to one T",
        },
        "lengths": {
            "shape": ["batch"],
            "dtype": "int64",
            "meaning": "valid frames per utterance (model.onnx only; the TVM library takes "
            f"feats alone, batch 1 x {frames} frames)",
        },
    }
    fe["model_output"] = {
        "log_probs": {
            "shape": ["batch", "out_frames", inventory.size],
            "dtype": "float32",
            "meaning": "natural-log class probabilities (log_softmax); classes in phones.json",
        },
        "out_lengths": OUTPUT_LENGTHS,
        "stride": OUTPUT_STRIDE,
        "frame_shift_ms": fe["output"]["frame_shift_ms"] * OUTPUT_STRIDE,
    }
    fe["onnxruntime"] = {
        "session_config": dict(ORT_SESSION_CONFIG),
        "why": "without it onnxruntime fuses low-bit weights feeding a MatMul into "
        "MatMulNBits at accuracy level 4, quantizing float activations to int8: not the plan",
    }
    (out / "frontend.json").write_text(json.dumps(fe, indent=2) + "\n")
    (out / "frontend.py").write_text(frontend_reference_source())
    (out / "phones.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "blank_index": 0,
                "symbols": ["<blank>", *inventory.phones],
                "n_outputs": inventory.size,
                "source": "espeak-ng phonemes (en-us), merged (voxfit.data.normalize_phone)",
            },
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )
    (out / "decode.py").write_text((_SELF / "_bundle_decode.py").read_text())

    conf = out / "conformance"
    conf.mkdir()
    pcm = _conformance_audio(feature_cfg, frames)
    _write_wav(conf / "audio.wav", pcm, feature_cfg.sample_rate_hz)
    feats = log_mel(torch.from_numpy(pcm.astype(np.float32) / 32768.0), feature_cfg)[None]
    lengths = torch.tensor([feats.shape[1]], dtype=torch.int64)
    lp, out_lens = _evaluated(model, feats, lengths)
    np.save(conf / "input.npy", feats.numpy().astype(np.float32))
    np.save(conf / "input_lengths.npy", lengths.numpy())
    np.save(conf / "expected_log_probs.npy", lp.numpy().astype(np.float32))
    np.save(conf / "expected_lengths.npy", out_lens.numpy().astype(np.int64))
    references = _runtime_references(conf, model, feats, lengths, tvm_unrounded)
    (ids,) = greedy_decode(lp, out_lens)
    act_quant = any(x.act_bits < 32 for x in cand.layers)
    expected = {
        "schema_version": CONFORMANCE_SCHEMA_VERSION,
        "source": f"synthetic test signal, {len(pcm)} samples (no speech, no recording)",
        "reference": "the plan's torch model, fake quantization on (what the search measured)",
        **({"references": references} if references else {}),
        "phones": inventory.decode(ids),
        "tolerance": {
            "min_frame_agreement": MIN_FRAME_AGREEMENT,
            **(
                {"max_prob_diff": MAX_PROB_DIFF_ACT_QUANT}
                if act_quant
                else {"max_abs_diff": MAX_ABS_DIFF}
            ),
            "features_max_abs_diff": FEATURES_MAX_ABS_DIFF,
            "note": "over valid output frames; max_abs_diff is in log-prob (nats), "
            "max_prob_diff in posterior probability (exp of the log-probs)",
        },
    }
    (conf / "expected.json").write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")

    state = adapter_state(adapters)
    kinds = {a.slot: a.kind for a in cand.adapters}
    (out / "adapters.md").write_text(_adapters_md(adapters, kinds, adapt, state))
    return {
        "files": [
            "frontend.json",
            "frontend.py",
            "phones.json",
            "decode.py",
            "adapters.md",
            *(f"conformance/{p.name}" for p in sorted(conf.iterdir())),
        ],
        "conformance": {
            "frames": int(feats.shape[1]),
            "out_frames": int(out_lens[0]),
            "phones": len(ids),
            **expected["tolerance"],  # type: ignore[dict-item]
        },
        "adapter_state": state,
    }


def _evaluated(
    model: nn.Module, feats: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output in eval mode, without gradients; its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(feats, lengths)  # type: ignore[no-any-return]
    finally:
        model.train(was_training)


def _runtime_references(
    conf: Path,
    model: nn.Module,
    feats: torch.Tensor,
    lengths: torch.Tensor,
    tvm_unrounded: Sequence[str],
) -> dict[str, dict[str, str]]:
    """Per-runtime references where a runtime computes other than the torch model."""
    from voxfit.compress import fake_quant_off, pair_saturation_off

    def run(name: str) -> None:
        lp, _ = _evaluated(model, feats, lengths)
        np.save(conf / name, lp.numpy().astype(np.float32))

    refs: dict[str, dict[str, str]] = {}
    with pair_saturation_off(model) as hooked:
        if hooked:
            run("expected_log_probs_onnxruntime.npy")
            refs["onnxruntime"] = {
                "file": "expected_log_probs_onnxruntime.npy",
                "why": f"onnxruntime's int8 does not saturate int16 pair sums ({len(hooked)} "
                "layers of the torch model emulate the TVM kernels' vpmaddubsw)",
            }
    if tvm_unrounded:
        with fake_quant_off(model, only=tvm_unrounded):
            run("expected_log_probs_tvm.npy")
        refs["tvm"] = {
            "file": "expected_log_probs_tvm.npy",
            "why": f"the library computes {len(tvm_unrounded)} layers with quantized "
            "activations in float32 without rounding their input: " + ", ".join(tvm_unrounded),
        }
    return refs


@dataclass(frozen=True, slots=True)
class ConformanceCheck:
    """One runtime on the bundle's conformance pair; ``error`` when it failed or mismatched,
    ``skipped`` (with the reason) when it cannot run on this machine."""

    runtime: str  # "frontend", "onnxruntime", "tvm"
    max_abs_diff: float | None = None
    frame_agreement: float | None = None
    error: str | None = None
    skipped: str | None = None
    max_prob_diff: float | None = None

    def line(self) -> str:
        if self.skipped:
            return f"{self.runtime}: not run ({self.skipped})"
        if self.error:
            return f"{self.runtime}: {self.error}"
        agree = (
            "" if self.frame_agreement is None else f"frame agreement {self.frame_agreement:.3f}, "
        )
        prob = "" if self.max_prob_diff is None else f", posteriors {self.max_prob_diff:.2g}"
        return f"{self.runtime}: {agree}max |diff| {self.max_abs_diff:.2g}{prob}"


@dataclass(frozen=True, slots=True)
class _Reference:
    """What one runtime's output is held to: the log-probs (``file`` in conformance/), the
    valid frames ``n`` and the tolerances."""

    want: np.ndarray
    n: int
    tol: dict[str, Any]
    file: str = DEFAULT_REF


def _compare(runtime: str, got: np.ndarray, ref: _Reference) -> ConformanceCheck:
    want, n, tol = ref.want, ref.n, ref.tol
    if got.shape != want.shape:
        return ConformanceCheck(runtime, error=f"output shape {got.shape}, expected {want.shape}")
    g, w = got[0, :n], want[0, :n]
    diff = float(np.max(np.abs(g - w))) if n else 0.0
    prob = float(np.max(np.abs(np.exp(g) - np.exp(w)))) if n else 0.0
    agree = float(np.mean(g.argmax(-1) == w.argmax(-1))) if n else 1.0
    if "max_prob_diff" in tol:
        value, bound, what = prob, tol["max_prob_diff"], "max posterior |diff|"
    else:
        value, bound, what = diff, tol["max_abs_diff"], "max |diff|"
    err = None
    if not np.isfinite(diff) or value > bound or agree < tol["min_frame_agreement"]:
        err = (
            f"conformance output differs from conformance/{ref.file} (frame "
            f"agreement {agree:.3f}, need >= {tol['min_frame_agreement']}; {what} "
            f"{value:.3g}, allowed {bound:g})"
        )
    return ConformanceCheck(runtime, diff, agree, err, max_prob_diff=prob)


def check_conformance(bundle: Path, *, run_tvm: bool = True) -> list[ConformanceCheck]:
    """Rerun ``conformance/`` through the bundle's front end, ONNX model and (where its
    target runs here) TVM library; empty when the bundle has no conformance pair."""
    conf = bundle / "conformance"
    if not (conf / "expected.json").is_file():
        return []
    try:
        expected = json.loads((conf / "expected.json").read_text())
        tol = expected["tolerance"]
        x = np.load(conf / "input.npy", allow_pickle=False)
        lengths = np.load(conf / "input_lengths.npy", allow_pickle=False)
        n = int(np.load(conf / "expected_lengths.npy", allow_pickle=False)[0])
        refs = {
            rt: str(expected.get("references", {}).get(rt, {}).get("file", DEFAULT_REF))
            for rt in ("onnxruntime", "tvm")
        }
        if any(Path(f).name != f for f in refs.values()):
            raise ValueError(f"references must name files in conformance/: {refs}")
        want = {
            rt: _Reference(np.load(conf / f, allow_pickle=False), n, tol, f)
            for rt, f in refs.items()
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return [
            ConformanceCheck("conformance", error=f"unreadable ({type(e).__name__}: {e})"[:300])
        ]
    checks = [
        _check_frontend(bundle, x, tol),
        _check_onnx(bundle, x, lengths, want["onnxruntime"]),
    ]
    if run_tvm:
        checks.append(_check_tvm(bundle, x, want["tvm"]))
    return checks


def _check_frontend(bundle: Path, x: np.ndarray, tol: dict[str, Any]) -> ConformanceCheck:
    """``python -I frontend.py conformance/audio.wav`` (the bundle's own code, isolated)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "feats.npy"
        try:
            r = subprocess.run(
                [sys.executable, "-I", "frontend.py", "conformance/audio.wav", str(out)],
                cwd=bundle,
                capture_output=True,
                text=True,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            return ConformanceCheck("frontend", error="frontend.py ran over 120 s")
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            return ConformanceCheck("frontend", error=f"frontend.py failed: {last[:200]}")
        got = np.load(out)
    if got.shape != x.shape:
        return ConformanceCheck("frontend", error=f"features {got.shape}, input.npy {x.shape}")
    diff = float(np.max(np.abs(got - x)))
    err = None
    if not diff <= tol["features_max_abs_diff"]:
        err = (
            f"frontend.py's features of conformance/audio.wav differ from conformance/"
            f"input.npy by {diff:.3g} (allowed {tol['features_max_abs_diff']:g})"
        )
    return ConformanceCheck("frontend", diff, None, err)


def _check_onnx(
    bundle: Path, x: np.ndarray, lengths: np.ndarray, ref: _Reference
) -> ConformanceCheck:
    from voxfit.compress import ort_session

    try:
        # the session config the bundle states (none in bundles from before it did)
        fe = json.loads((bundle / "frontend.json").read_text())
        config = dict(fe.get("onnxruntime", {}).get("session_config", {}))
    except (OSError, ValueError, AttributeError) as e:
        return ConformanceCheck("onnxruntime", error=f"frontend.json unreadable: {e}"[:300])
    try:
        sess = ort_session(bundle / "model.onnx", config)
        got = sess.run(None, {"feats": x, "lengths": lengths})[0]
    except Exception as e:  # noqa: BLE001 - a model onnxruntime refuses is a problem line
        return ConformanceCheck("onnxruntime", error=f"model.onnx does not run: {str(e)[:200]}")
    return _compare("onnxruntime", got, ref)


def _check_tvm(bundle: Path, x: np.ndarray, ref: _Reference) -> ConformanceCheck:
    from voxfit.hw_profiles import target_runs_here

    try:
        report = json.loads((bundle / "report.json").read_text())
        target = report["profile"]["target"]
        lib = bundle / report["tvm"]["lib"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return ConformanceCheck("tvm", skipped=f"report.json names no TVM library ({e})")
    runs, why = target_runs_here(target)
    if not runs:
        return ConformanceCheck("tvm", skipped=why)
    if not lib.resolve().is_relative_to(bundle.resolve()) or not lib.is_file():
        return ConformanceCheck("tvm", error=f"{lib.name}: missing from the bundle")
    from voxfit.compile import TvmWorker

    with TvmWorker(2) as worker:
        r = worker.call(
            "run_local",
            timeout_s=300,
            lib=str(lib.resolve()),
            input=x,
            device="cuda" if target.get("kind") == "cuda" else "cpu",
        )
    if "error" in r:
        return ConformanceCheck("tvm", error=f"{lib.name} does not run: {r['error'][:200]}")
    return _compare("tvm", np.asarray(r["output"]), ref)
