"""Latency estimators that measure: what a candidate costs on a profile's device, in ms.

Every estimator returns one :class:`LatencyResult` per profile input; a compile, upload or
run failure is a result with ``error`` set (the search records the trial as failed and goes
on), never an exception. Peak memory is TVM's statically planned activation storage plus
the weights at their stored bit-widths.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

from torch import nn

from voxfit.compile import CompileResult, TvmWorker, compile_model, default_tuning_dir
from voxfit.errors import ConfigError, ModelError
from voxfit.hw_profiles import HardwareProfile, InputSpec, host_runs
from voxfit.metrics import packed_size_bytes

Method = Literal["local", "rpc", "predicted"]


@dataclass(frozen=True, slots=True)
class LatencyResult:
    """Latency of one input on one profile; ``median_ms`` is None when ``error`` is set."""

    profile: str
    input: str
    frames: int
    method: Method
    median_ms: float | None = None
    iqr_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    repeats: int = 0
    threads: int = 0
    activation_bytes: int | None = None
    weight_bytes: int | None = None
    measure_s: float = 0.0
    compile: CompileResult | None = None
    error: str | None = None
    samples_ms: tuple[float, ...] = field(default=(), compare=False)
    # (kernel name, median ms) in call order, when the estimator profiles kernels
    calls: tuple[tuple[str, float], ...] = field(default=(), compare=False)
    note: str = ""  # e.g. why a predicted latency is low-confidence
    # with a reference model timed in alternating rounds: its median, and the median of
    # the per-round (this / reference) ratios -- a drift-free relative latency
    reference_ms: float | None = None
    relative: float | None = None
    relative_iqr: float | None = None
    # coefficients of variation (stdev / mean) of the samples and of the per-round ratios;
    # None when unknown (a prediction, a single sample)
    cv: float | None = None
    relative_cv: float | None = None
    # timing tries it took (a noisy one is timed again, see repeat_while_noisy); 0: none
    tries: int = 0
    # still above the profile's measurement.max_cv after every try (kept, but flagged)
    noisy: bool = False
    # paired timing whose reference still ran slow (under load) after every try (kept, but
    # flagged; see repeat_while_loaded)
    loaded: bool = False
    # a prediction the predictor does not trust (a task kind or size it never saw)
    low_confidence: bool = False
    # the machine speed ``value_ms`` is at: ``raw`` (this moment's), ``reference`` (the
    # cost model's reference speed) or ``base`` (the quietest time of the base model timed
    # alongside; see PromotingEstimator)
    basis: Literal["raw", "reference", "base"] = "raw"
    at_reference_ms: float | None = None
    # for a measurement promoted from a prediction: that prediction
    predicted: LatencyResult | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None and self.median_ms is not None

    @property
    def value_ms(self) -> float | None:
        """The latency on ``basis``'s scale: at the reference speed where known, else the
        median."""
        return self.at_reference_ms if self.at_reference_ms is not None else self.median_ms

    @property
    def peak_memory_mb(self) -> float | None:
        """Activations (static plan) + weights, in MB (1e6 bytes)."""
        if self.activation_bytes is None or self.weight_bytes is None:
            return None
        return (self.activation_bytes + self.weight_bytes) / 1e6

    def to_dict(self) -> dict[str, Any]:
        c = self.compile
        return {
            "profile": self.profile,
            "input": self.input,
            "frames": self.frames,
            "method": self.method,
            "median_ms": self.median_ms,
            "iqr_ms": self.iqr_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "repeats": self.repeats,
            "threads": self.threads,
            "peak_memory_mb": self.peak_memory_mb,
            "measure_s": self.measure_s,
            "error": self.error,
            "note": self.note,
            "reference_ms": self.reference_ms,
            "relative": self.relative,
            "relative_iqr": self.relative_iqr,
            "cv": self.cv,
            "relative_cv": self.relative_cv,
            "tries": self.tries,
            "noisy": self.noisy,
            "loaded": self.loaded,
            "low_confidence": self.low_confidence,
            "basis": self.basis,
            "at_reference_ms": self.at_reference_ms,
            "predicted_ms": None if self.predicted is None else self.predicted.median_ms,
            "compile": None
            if c is None
            else {
                "n_tasks": c.n_tasks,
                "new_tasks": c.new_tasks,
                "tuned_trials": c.tuned_trials,
                "tune_s": c.tune_s,
                "build_s": c.build_s,
                "total_s": c.total_s,
                "lowering": c.lowering,
                "error": c.error,
            },
        }


class LatencyEstimator(Protocol):
    """Estimates a model's latency on a profile.

    Lifecycle: construct for one profile, call :meth:`estimate` for any number of
    candidates, then :meth:`close` (or use as a context manager) to free worker processes.
    """

    profile: HardwareProfile

    def estimate(
        self, model: nn.Module, inputs: tuple[InputSpec, ...] | None = None
    ) -> list[LatencyResult]: ...

    def close(self) -> None: ...


class _TvmEstimator:
    """Compile with the profile's tuning database, then time (subclasses say where)."""

    method: Method
    export_library = True  # the RPC path uploads the file; local measurement needs none
    # re-time paired timings taken under load (repeat_while_loaded): one machine only -- the
    # servers behind an RPC key may differ in speed, so a slower one is not "loaded"
    load_guard = False

    def __init__(
        self,
        profile: HardwareProfile,
        work_dir: str | Path,
        *,
        cost_models_dir: str | Path = "cost_models",
        tuning_dir: str | Path | None = None,
        tune: bool = True,
        worker: TvmWorker | None = None,
        measure_timeout_s: float = 600.0,
        reference: nn.Module | None = None,
    ) -> None:
        """``cost_models_dir``: where the shipped (read-only) tuning records are;
        ``tuning_dir``: the user's tuning database that takes new records (default:
        ``<work_dir>/tuning/<profile>``; pass ``voxfit.compile.default_tuning_dir(work,
        profile)`` to share one per work folder); ``measure_timeout_s``: one timing try's
        bound; ``reference``: a model timed in rounds alternating with each candidate, on
        the same device (results carry ``reference_ms``, ``relative``, ``relative_iqr``
        and ``relative_cv``), compiled once per input, at its first estimate."""
        self.profile = profile
        self.work_dir = Path(work_dir)
        self.cost_models_dir = Path(cost_models_dir)
        self.tuning_dir = (
            Path(tuning_dir) if tuning_dir is not None else default_tuning_dir(work_dir, profile)
        )
        self.tune = tune
        self.measure_timeout_s = measure_timeout_s
        self._own_worker = worker is None
        self.worker = worker or TvmWorker(profile.cores)
        self.reference = reference
        self._reference_libs: dict[str, str] = {}
        # per input: the quietest reference median this estimator has timed (load guard)
        self._quiet_ms: dict[str, float] = {}
        self._n = 0

    def __enter__(self) -> _TvmEstimator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_worker:
            self.worker.close()

    def _measure(self, c: CompileResult, reference: str | None) -> dict[str, Any]:
        """One timing try of ``c`` (paired with the ``reference`` library when given): the
        worker op's result dict, or ``{"error": ...}``."""
        raise NotImplementedError

    def _reference_lib(self, c: CompileResult) -> str | None:
        """The reference model's library for ``c``'s input (None without a reference),
        compiled at the first call for that input.

        Raises:
            ModelError: the reference model failed to compile.
        """
        if self.reference is None:
            return None
        if c.input not in self._reference_libs:
            spec = InputSpec(name=c.input, frames=c.frames)
            (r,) = compile_model(
                self.reference,
                self.profile,
                self.worker,
                self.work_dir / f"reference-{c.input}-{os.getpid()}",
                inputs=(spec,),
                cost_models_dir=self.cost_models_dir,
                tuning_dir=self.tuning_dir,
                tune=self.tune,
                # a file: the local worker keeps it loaded whatever it builds next, and the
                # RPC path uploads it
                export=True,
            )
            if not r.ok or r.lib is None:
                raise ModelError(f"reference model ({c.input}) failed to compile: {r.error}")
            self._reference_libs[c.input] = str(r.lib)
        return self._reference_libs[c.input]

    def _measure_request(self, c: CompileResult, reference: str | None) -> dict[str, Any]:
        """The worker-call arguments both measurement paths share."""
        m = self.profile.measurement
        return {
            "timeout_s": self.measure_timeout_s,
            "lib": str(c.lib),
            "reference": reference,
            "frames": c.frames,
            "n_mels": c.n_mels,
            "measurement": {
                "warmup": m.warmup,
                "repeats": m.repeats,
                "min_repeat_ms": m.min_repeat_ms,
            },
            "device": "cuda" if self.profile.target["kind"] == "cuda" else "cpu",
        }

    def estimate(
        self, model: nn.Module, inputs: tuple[InputSpec, ...] | None = None
    ) -> list[LatencyResult]:
        """Compile (tuning new tasks) and measure each input; failures become results."""
        self._n += 1
        # the pid: estimators of several workers may share ``work_dir``
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out_dir = self.work_dir / f"build-{stamp}-{os.getpid()}-{self._n}"
        compiled = compile_model(
            model,
            self.profile,
            self.worker,
            out_dir,
            inputs=inputs,
            cost_models_dir=self.cost_models_dir,
            tuning_dir=self.tuning_dir,
            tune=self.tune,
            export=self.export_library,
        )
        weights = packed_size_bytes(model)
        results = []
        for c in compiled:
            base: dict[str, Any] = dict(
                profile=self.profile.name,
                input=c.input,
                frames=c.frames,
                method=self.method,
                compile=c,
                weight_bytes=weights,
                activation_bytes=c.memory_bytes,
            )
            if not c.ok:
                results.append(LatencyResult(**base, error=f"compile: {c.error}"))
                continue
            t0 = time.monotonic()
            try:
                ref = self._reference_lib(c)
            except ModelError as e:
                took = time.monotonic() - t0
                results.append(LatencyResult(**base, measure_s=took, error=str(e)))
                continue
            m = self.profile.measurement
            timing = partial(
                repeat_while_noisy, partial(self._measure, c, ref), m.max_cv, m.max_repeats
            )
            if self.load_guard:
                r = repeat_while_loaded(timing, self._quiet_ms, c.input, m.max_repeats)
            else:
                r = timing()
            took = time.monotonic() - t0
            if "error" in r:
                results.append(LatencyResult(**base, measure_s=took, error=r["error"]))
                continue
            results.append(
                LatencyResult(
                    **base,
                    median_ms=r["median_ms"],
                    iqr_ms=r["iqr_ms"],
                    min_ms=r["min_ms"],
                    max_ms=r["max_ms"],
                    repeats=len(r["samples_ms"]),
                    threads=r.get("threads", self.profile.cores),
                    measure_s=took,
                    samples_ms=tuple(r["samples_ms"]),
                    calls=tuple((str(n), float(t)) for n, t in r.get("calls", ())),
                    reference_ms=r.get("reference_ms"),
                    relative=r.get("relative"),
                    relative_iqr=r.get("relative_iqr"),
                    cv=r.get("cv"),
                    relative_cv=r.get("relative_cv"),
                    tries=int(r["tries"]),
                    noisy=bool(r["noisy"]),
                    loaded=bool(r.get("loaded", False)),
                    note="; ".join(
                        x for x in (_noise_note(r, m.max_cv), _load_note(r), _retry_note(r)) if x
                    ),
                )
            )
        return results


def _spread(r: dict[str, Any]) -> float | None:
    """What decides whether a timing is steady: the CV of the per-round ratios when it was
    paired with a reference (drift both share cancels), else the CV of its samples."""
    cv = r.get("relative_cv") if r.get("relative") is not None else r.get("cv")
    return None if cv is None else float(cv)


def repeat_while_noisy(
    measure: Callable[[], dict[str, Any]], max_cv: float, max_repeats: int
) -> dict[str, Any]:
    """Call ``measure`` (one timing try: a result dict with ``cv``, or ``relative_cv`` when
    paired, or ``{"error": ...}``) again while its :func:`_spread` is above ``max_cv``, up
    to ``max_repeats`` more times, and return the steadiest try.

    The result gains ``tries`` (how many were made), ``try_cvs`` (each try's spread, in
    order) and ``noisy`` (the kept try is still above ``max_cv``): a noisy measurement is
    kept and says so, never passed off as steady. A try whose spread is unknown (a single
    sample) is accepted. An error on the first try is the result; an error on a later try
    ends the repeats, the steadiest earlier try is kept and ``repeat_error`` says why.
    """
    first = measure()
    if "error" in first:
        return first
    best, cvs, error = first, [_spread(first)], None
    while len(cvs) <= max_repeats and cvs[-1] is not None and cvs[-1] > max_cv:
        r = measure()
        if "error" in r:
            error = str(r["error"])
            break
        cv, best_cv = _spread(r), _spread(best)
        cvs.append(cv)
        if cv is not None and best_cv is not None and cv < best_cv:
            best = r
    final = _spread(best)
    out = {**best, "tries": len(cvs), "try_cvs": cvs}
    out["noisy"] = final is not None and final > max_cv
    if error is not None:
        out["repeat_error"] = error
    return out


#: a paired timing whose reference ran this much slower than the quietest reference timing
#: seen is taken under load and timed again: measured on the shared 2-core host (50
#: candidates timed twice, paired with the base), relative latencies from quiet tries
#: agreed within 10% (0 of 26 off by more), but where the reference ran 15-25% slow, the
#: relative shifted by up to 17% -- a burst of load does not slow both models alike
LOADED_MARGIN = 0.10


def repeat_while_loaded(
    measure: Callable[[], dict[str, Any]],
    quiet_ms: dict[str, float],
    key: str,
    max_repeats: int,
    margin: float = LOADED_MARGIN,
) -> dict[str, Any]:
    """Call ``measure`` (a paired timing: a result dict with ``reference_ms``) again while
    its reference ran more than ``margin`` slower than ``quiet_ms[key]`` (the quietest
    reference median seen so far, updated here), up to ``max_repeats`` more times, and
    return the try whose reference ran fastest. Unpaired timings and errors pass through.

    The result gains ``loaded_tries`` (tries judged taken under load) and ``loaded`` (the
    kept try still is). The first timings of a run set the baseline, so a run that starts
    under load guards only once the host has been quiet once.
    """
    first = measure()
    if "error" in first or first.get("reference_ms") is None:
        return first
    refs = [float(first["reference_ms"])]
    quiet_ms[key] = min(quiet_ms.get(key, refs[0]), refs[0])
    best = first
    while (
        float(best["reference_ms"]) > quiet_ms[key] * (1.0 + margin) and len(refs) <= max_repeats
    ):
        r = measure()
        if "error" in r or r.get("reference_ms") is None:
            break
        refs.append(float(r["reference_ms"]))
        quiet_ms[key] = min(quiet_ms[key], refs[-1])
        if refs[-1] < float(best["reference_ms"]):
            best = r
    limit = quiet_ms[key] * (1.0 + margin)
    return {
        **best,
        "loaded_tries": sum(x > limit for x in refs),
        "loaded": float(best["reference_ms"]) > limit,
    }


def _load_note(r: dict[str, Any]) -> str:
    """What the load guard did (empty when the first try was quiet)."""
    n = int(r.get("loaded_tries", 0))
    if not n:
        return ""
    if r.get("loaded"):
        return f"under load: the reference ran slow in all {n} tries; kept the quietest"
    return f"under load at first: timed {n} more time{'s' * (n > 1)}, kept a quiet try"


def _noise_note(r: dict[str, Any], max_cv: float) -> str:
    """What the repeats of a noisy measurement found (empty when the first try was steady)."""
    if int(r.get("tries", 1)) <= 1 and not r.get("noisy"):
        return ""
    cvs = ", ".join("?" if x is None else f"{x:.3f}" for x in r.get("try_cvs", ()))
    what = "relative CV" if r.get("relative") is not None else "CV"
    if r.get("noisy"):
        text = f"noisy: {what} above {max_cv:g} in all {r['tries']} tries ({cvs}); kept the lowest"
    else:
        text = f"{what} above {max_cv:g} at first, steady on try {r['tries']} ({cvs})"
    if r.get("repeat_error"):
        text += f"; a repeat failed: {r['repeat_error']}"
    return text


def _retry_note(r: dict[str, Any]) -> str:
    """What a measurement that needed another device went through (empty otherwise)."""
    errors = r.get("device_errors") or []
    if not errors:
        return ""
    return f"measured on attempt {r.get('attempts')} after: " + " | ".join(errors)


class TvmLocalEstimator(_TvmEstimator):
    """Measures on this machine with TVM's ``time_evaluator`` (threads = profile cores).

    Raises:
        ConfigError: at construction, when this CPU cannot run the profile's target code.
    """

    method: Method = "local"
    export_library = False
    load_guard = True

    def __init__(
        self, profile: HardwareProfile, work_dir: str | Path, *, profile_calls: int = 0, **kw: Any
    ) -> None:
        """``profile_calls`` > 0: also time every kernel over that many runs (``calls``);
        the rest as for every TVM estimator (``reference``, ``worker``, ...).

        Raises:
            ConfigError: this CPU cannot run the profile's target code.
        """
        ok, why = host_runs(profile)
        if not ok:
            raise ConfigError(f"{profile.source or profile.name}: cannot measure locally: {why}")
        super().__init__(profile, work_dir, **kw)
        self.profile_calls = profile_calls

    def _measure(self, c: CompileResult, reference: str | None) -> dict[str, Any]:
        return self.worker.call(
            "measure_local", calls=self.profile_calls, **self._measure_request(c, reference)
        )


class TvmRpcEstimator(_TvmEstimator):
    """Measures on a device leased from the profile's TVM RPC tracker.

    A farm registers several servers under the profile's device key; each measurement
    leases whichever is free, and a device that fails mid-measurement (killed, unplugged)
    costs a retry on another one, up to ``measurement.rpc.attempts`` leases in all, not a
    failed measurement. The result's ``note`` says when a retry was needed. With
    ``reference``, both libraries go to the leased device and are timed there in
    alternating rounds, so a device shared with other jobs shifts both alike.

    Raises:
        ConfigError: at construction, when the profile has no ``measurement.rpc``.
    """

    method: Method = "rpc"

    def __init__(self, profile: HardwareProfile, work_dir: str | Path, **kw: Any) -> None:
        if profile.measurement.rpc is None:
            raise ConfigError(f"{profile.source or profile.name}: measurement.rpc is required")
        super().__init__(profile, work_dir, **kw)
        self.rpc = profile.measurement.rpc

    def _measure(self, c: CompileResult, reference: str | None) -> dict[str, Any]:
        req = self._measure_request(c, reference)
        # the worker's bound must cover every attempt's tracker, queue and run timeouts: a
        # long queue wait on a shared device is what they are for, not a hung worker
        r = self.rpc
        run_s = r.run_timeout_s if r.run_timeout_s is not None else r.session_timeout_s
        per_attempt_s = r.connect_timeout_s + r.queue_wait_s + run_s + 5.0
        req["timeout_s"] = max(float(req["timeout_s"]), r.attempts * per_attempt_s)
        return self.worker.call("measure_rpc", **req, rpc=asdict(r))


def summarize(results: list[LatencyResult]) -> str:
    """One line per input: median ± IQR, or the error."""
    parts = []
    for r in results:
        if r.ok and r.median_ms is not None:
            iqr = r.iqr_ms if r.iqr_ms is not None and math.isfinite(r.iqr_ms) else 0.0
            parts.append(f"{r.input}: {r.median_ms:.3f} ms (IQR {iqr:.3f})")
        else:
            parts.append(f"{r.input}: {r.error}")
    return "; ".join(parts)
