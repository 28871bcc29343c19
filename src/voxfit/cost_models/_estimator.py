"""The fitted cost model as the latency stack's predictor (``voxfit.latency``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from torch import nn

from voxfit.cost_models._features import Task, decompose
from voxfit.cost_models._model import CostModel, load_for
from voxfit.cost_models._transfer import TransferModel
from voxfit.errors import ConfigError, VoxfitError
from voxfit.hw_profiles import HardwareProfile, HostInfo, describe_host
from voxfit.latency import PredictedEstimator, PredictedLatency

log = logging.getLogger(__name__)

HostMismatch = Literal["calibrate", "flag", "ignore"]
#: measurements a host calibration needs before its predictions are used
CALIBRATION_SAMPLES = 8
# one warning per (fitting host, this host) pair and process, not one per prediction
_warned: set[str] = set()


class CostModelPredictor:
    """A :class:`~voxfit.latency.LatencyPredictor` backed by a fitted :class:`CostModel`.

    Its milliseconds are at the reference speed when the model was fitted on drift-free
    labels (its card knows the reference model's typical time), else raw medians.

    ``host_mismatch`` says what a card fitted on another kind of host means here
    (:meth:`CostModel.host_check`): ``"flag"`` (default) marks every prediction
    ``low_confidence`` with the reason, so the latency stack measures it instead of
    trusting it; ``"ignore"`` uses the predictions as they are. Flagging is the default
    because the ranking transfers but the milliseconds do not: the shipped x86 model put 96%
    of held-out candidates within +-10% on its own host and 69% on a Zen 2 host (Spearman
    0.98 there), so a budget decided on predicted ms would be wrong by up to 26%. Choose
    ``"ignore"`` when ranking is enough or the host is known to be equivalent. A card that
    does not record its host is never flagged for it (its host is unknown, not different).

    ``"calibrate"`` (the default) flags like ``"flag"`` at first and learns this host from
    the measurements the search makes anyway (baselines, promoted candidates: the latency
    stack hands each to :meth:`observe`, at the model's reference speed): once
    ``min_samples`` are in, predictions come from a transfer model fitted on them
    (:mod:`voxfit.cost_models._transfer`: per-kernel-kind scales of this model's
    predictions), refitted at each new sample, and are no longer flagged. A card that
    does not record its host is calibrated too (nothing vouches for this host), but its
    predictions are not flagged meanwhile. :attr:`calibration` says which host, how many
    samples and since when.
    Either way a mismatch is logged once per process, naming both hosts. ``current_host``
    stands for this machine (default :func:`~voxfit.hw_profiles.describe_host`).

    Raises:
        ConfigError: ``host_mismatch`` is neither ``"flag"`` nor ``"ignore"``.
    """

    def __init__(
        self,
        model: CostModel | TransferModel,
        host_mismatch: HostMismatch = "calibrate",
        current_host: HostInfo | None = None,
        min_samples: int = CALIBRATION_SAMPLES,
        profile: HardwareProfile | None = None,
    ) -> None:
        if host_mismatch not in get_args(HostMismatch):
            raise ConfigError(
                f"host_mismatch: expected one of {', '.join(get_args(HostMismatch))}, "
                f"got {host_mismatch!r}"
            )
        self.model = model
        self.basis: Literal["raw", "reference"] = (
            "reference" if model.card.get("reference_ms") else "raw"
        )
        self.host_mismatch = host_mismatch
        self.host_same, self.host_why = model.host_check(current_host)
        self._host_reasons: tuple[str, ...] = ()
        self.min_samples = max(3, int(min_samples))
        self._current_host = current_host
        self._samples: list[tuple[list[Task], float]] = []
        self._calibrated: TransferModel | None = None
        unknown = self.model.card.get("host") is None
        self.profile = profile
        self.calibrating = (
            host_mismatch == "calibrate"
            and (not self.host_same or unknown)
            and isinstance(model, CostModel)
            and profile is not None
        )
        if not self.host_same:
            if host_mismatch in ("flag", "calibrate"):
                self._host_reasons = (f"cost model from another host: {self.host_why}",)
            if self.host_why not in _warned:
                _warned.add(self.host_why)
                log.warning(
                    "cost model %s %s; %s",
                    model.directory or "(not saved)",
                    self.host_why,
                    "host_mismatch='ignore': its predictions are used as they are"
                    if host_mismatch == "ignore"
                    else "its predictions are low-confidence and get measured"
                    + (" until calibrated to this host" if self.calibrating else ""),
                )

    @property
    def card(self) -> Mapping[str, Any]:
        return self.model.card

    def predict(self, model: nn.Module, frames: int) -> PredictedLatency:
        """Raises ModelError for a model it cannot decompose into its tasks."""
        tasks = decompose(model, frames)
        cal = self._calibrated
        p = (cal or self.model).predict_tasks(tasks)
        host = () if cal is not None else self._host_reasons
        # the largest task's activations: what a static memory plan must hold at once
        act_bytes = int(max((t.features["act_kb"] for t in tasks), default=0.0) * 1e3)
        return PredictedLatency(
            ms=p.ms,
            activation_bytes=act_bytes,
            low_confidence=p.low_confidence or bool(host),
            reasons=p.reasons + host,
        )

    def observe(self, model: nn.Module, frames: int, ms_at_reference: float) -> None:
        """A measurement of ``model`` on this host, at the model's reference speed (the
        latency stack's ``at_reference_ms``): a calibration sample. Ignored unless
        calibrating, or for a model it cannot decompose."""
        if not self.calibrating or not (ms_at_reference > 0):
            return
        try:
            tasks = decompose(model, frames)
        except VoxfitError:
            return
        self._samples.append((tasks, float(ms_at_reference)))
        if len(self._samples) < self.min_samples:
            return
        from voxfit.cost_models._transfer import fit_transfer

        assert isinstance(self.model, CostModel)
        assert self.profile is not None
        cal = fit_transfer(
            self.model, self._samples, self.profile, host=self._current_host,
            reference_ms=self.model.card.get("reference_ms"),
        )  # fmt: skip
        if self._calibrated is None:
            log.info(
                "latency model calibrated to this host from %d measurements", len(self._samples)
            )
        self._calibrated = cal

    @property
    def calibration(self) -> dict[str, Any] | None:
        """Which host the predictions are calibrated to, from how many measurements (None
        when not calibrating)."""
        if not self.calibrating:
            return None
        host = self._current_host or describe_host()
        cal = self._calibrated
        return {
            "host": host.as_dict(),
            "fitted_host": self.model.card.get("host"),
            "samples": len(self._samples),
            "needed": self.min_samples,
            "active": cal is not None,
            "coef": cal.card["coef"] if cal is not None else None,
            "fit_mape": cal.card["fit_metrics"]["mape"] if cal is not None else None,
        }

    def reference_ms(self, input_name: str, reference: nn.Module) -> float | None:
        from voxfit.cost_models._dataset import reference_key

        known = self.model.card.get("reference_ms") or {}
        ms = known.get(f"{input_name}@{reference_key(reference)}")
        return float(ms) if ms else None


class KernelPredictor(CostModelPredictor):
    """A device's kernel model (:mod:`voxfit.cost_models._kernels`) where it can predict a
    candidate, its transfer model (this class's base) where it cannot.

    A prediction exports the candidate and lists its TVM tasks in a TVM worker process
    (about a second: no tuning, no build), then sums the device's own records of them. A
    candidate whose every kernel is in the table is predicted with confidence; one with
    estimated kernels keeps the transfer model's flags. :meth:`close` stops the worker.

    ``kernels`` None and a ``host_table`` (this host's times of the profile's schedules,
    :mod:`voxfit.cost_models._host_kernels`): a cost model fitted on another host, calibrated
    here by kernels. Each measurement :meth:`observe` gets (the base's rounds, promoted
    trials) is also a kernel sample; from ``min_samples`` on, the kernel model fitted on
    them over the table predicts (refitted at each sample), and until then the cost model
    (flagged, so the latency stack measures). Measured on an Intel host for the x86 model
    fitted on AMD: see the README's sibling-host figures.
    """

    def __init__(
        self,
        model: CostModel | TransferModel,
        kernels: Any,
        *,
        host_table: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self.kernels = kernels
        self.host_table = host_table if self.calibrating else None
        self._ksamples: list[tuple[list[Any], float]] = []
        self._worker: Any = None
        self._tmp: Path | None = None
        self.counts = {"kernels": 0, "estimated": 0, "transfer": 0}

    def _keys(self, model: nn.Module, frames: int) -> list[Any]:
        import tempfile

        from voxfit.compile import TvmWorker
        from voxfit.compile._compile import export_program
        from voxfit.models import n_mels_of

        assert self.profile is not None
        if self._worker is None:
            self._worker = TvmWorker(self.profile.cores)
            self._tmp = Path(tempfile.mkdtemp(prefix="voxfit-kernels-"))
        assert self._tmp is not None
        program = export_program(model, frames, self._tmp / "p.pt2", n_mels_of(model))
        r = self._worker.call("task_keys", program=str(program), profile=self.profile.to_dict())
        if "error" in r:
            raise VoxfitError(f"listing the TVM tasks: {r['error']}")
        return list(r["task_keys"])

    def observe(self, model: nn.Module, frames: int, ms_at_reference: float) -> None:
        super().observe(model, frames, ms_at_reference)
        if self.host_table is None or not (ms_at_reference > 0):
            return
        from voxfit.cost_models._kernels import fit_kernels

        try:
            self._ksamples.append((self._keys(model, frames), float(ms_at_reference)))
        except VoxfitError as e:
            log.debug("kernel sample not taken: %s", e)
            return
        if len(self._ksamples) < self.min_samples:
            return
        try:
            fitted = fit_kernels(self._ksamples, self.host_table)
        except ConfigError as e:  # too few samples with every kernel timed here
            log.debug("no kernel calibration yet: %s", e)
            return
        if self.kernels is None:
            log.info(
                "latency model calibrated to this host by its kernels (%d timed here) from "
                "%d measurements",
                len(self.host_table),
                len(self._ksamples),
            )
        self.kernels = fitted

    @property
    def calibration(self) -> dict[str, Any] | None:
        out = super().calibration
        if out is not None and self.host_table is not None:
            k = self.kernels
            out["kernels"] = {
                "timed_here": len(self.host_table),
                "samples": len(self._ksamples),
                "active": k is not None,
                "coef": k.card["coef"] if k is not None else None,
                "fit_mape": k.card["fit_metrics"]["mape"] if k is not None else None,
                "predicted": dict(self.counts),
            }
        return out

    def predict(self, model: nn.Module, frames: int) -> PredictedLatency:
        p = super().predict(model, frames)
        if self.kernels is None:  # a host calibration not fitted yet
            self.counts["transfer"] += 1
            return p
        try:
            ms, estimated = self.kernels.predict_keys(self._keys(model, frames))
        except VoxfitError as e:
            log.debug("kernel model: %s; the transfer model predicts", e)
            ms, estimated = None, 0
        if ms is None:
            self.counts["transfer"] += 1
            return p
        self.counts["kernels" if not estimated else "estimated"] += 1
        return PredictedLatency(
            ms=ms,
            activation_bytes=p.activation_bytes,
            low_confidence=p.low_confidence if estimated else False,
            reasons=p.reasons if estimated else (),
        )

    def close(self) -> None:
        import shutil

        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _with_kernels(
    model: CostModel | TransferModel,
    host_mismatch: HostMismatch,
    profile: HardwareProfile,
    host_table: dict[str, float] | None = None,
) -> CostModelPredictor:
    """The predictor of a fitted model: a :class:`KernelPredictor` for an onboarded device
    whose folder holds a kernel model, or for a model from another host with this host's
    kernel table (``host_table``) to calibrate by; else a :class:`CostModelPredictor`."""
    from voxfit.cost_models._kernels import KERNELS_FILE, KernelModel

    d = model.directory
    if isinstance(model, TransferModel) and d is not None and (Path(d) / KERNELS_FILE).exists():
        return KernelPredictor(
            model, KernelModel.load(d), host_mismatch=host_mismatch, profile=profile
        )
    if host_table:
        p = KernelPredictor(
            model, None, host_table=host_table, host_mismatch=host_mismatch, profile=profile
        )
        if p.host_table is not None:  # calibrating: another host's model, or one unknown
            return p
    return CostModelPredictor(model, host_mismatch, profile=profile)


def load_predictor(
    profile: HardwareProfile,
    cost_models_dir: str | Path = "cost_models",
    directory: str | Path | None = None,
    host_mismatch: HostMismatch = "calibrate",
    work: str | Path | None = None,
) -> CostModelPredictor:
    """The profile's cost model as a predictor: the one saved in ``directory`` (``voxfit
    cost-model fit`` output) if given, else the shipped one under ``cost_models_dir``.
    ``host_mismatch``: see :class:`CostModelPredictor`; a model calibrating to this host
    does it by kernels where ``work`` holds this host's kernel table (``voxfit device
    time-kernels``, :mod:`voxfit.cost_models._host_kernels`).

    Raises:
        ConfigError: no cost model there, or it was trained for another profile.
        DataError: this host's kernel table is torn.
    """
    from voxfit.cost_models._host_kernels import host_table

    table = host_table(profile, work) if work is not None else None
    model = load_for(profile, cost_models_dir, directory)
    return _with_kernels(model, host_mismatch, profile, table)


def predicted_estimator(
    profile: HardwareProfile,
    cost_models_dir: str | Path = "cost_models",
    model: CostModel | TransferModel | None = None,
    host_mismatch: HostMismatch = "calibrate",
) -> PredictedEstimator:
    """A predicting estimator for ``profile`` (``model``, or the profile's fitted one).
    ``host_mismatch``: see :class:`CostModelPredictor`.

    Raises:
        ConfigError: no cost model, or one trained for another profile.
    """
    if model is not None:
        model.check_profile(profile)
        return PredictedEstimator(profile, _with_kernels(model, host_mismatch, profile))
    return PredictedEstimator(
        profile, load_predictor(profile, cost_models_dir, host_mismatch=host_mismatch)
    )
