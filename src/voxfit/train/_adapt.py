"""The adaptation-quality measurement (full) and its cheap proxy.

*Full*: for every held-out speaker, train only the adapters on their adaptation set
(:class:`AdaptConfig` steps) and measure PER on their whole evaluation set before and after.
*Proxy*: the same on a few speakers, with few steps and a few evaluation utterances.

Two figures come out: **post-adaptation PER** (what the user experiences; what the search
minimizes) and **retention** = (PER before - PER after) of the compressed model divided by
the same gain of the uncompressed base model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from voxfit.data import FeatureStore, Manifest, PhoneInventory
from voxfit.errors import ConfigError
from voxfit.metrics import phone_error_rate
from voxfit.train._loop import AdaptConfig, adapt_speaker


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The cheap estimate: ``n_speakers`` spread over the held-out set, short adaptation."""

    n_speakers: int = 3
    steps: int = 25
    max_eval_utts: int = 10
    lr: float = 5e-3
    schema_version: int = 1


@dataclass(slots=True)
class SpeakerAdaptation:
    """PER (%) of one speaker's evaluation utterances before and after adaptation."""

    speaker: str
    per_before: float
    per_after: float
    n_adapt: int = 0  # adaptation utterances used
    n_eval: int = 0  # evaluation utterances scored


@dataclass(slots=True)
class AdaptationResult:
    """Per-speaker results and their means; ``seconds`` is the wall time it took."""

    speakers: list[SpeakerAdaptation] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def per_before(self) -> float:
        return sum(s.per_before for s in self.speakers) / max(1, len(self.speakers))

    @property
    def per_after(self) -> float:
        return sum(s.per_after for s in self.speakers) / max(1, len(self.speakers))

    @property
    def gain(self) -> float:
        """Mean PER points adaptation removes."""
        return self.per_before - self.per_after

    def retention(self, base: AdaptationResult) -> float:
        """This gain as a fraction of ``base``'s gain (0 when the base gains nothing)."""
        return self.gain / base.gain if base.gain > 0 else 0.0


def heldout_speakers(manifest: Manifest) -> list[str]:
    """Held-out speakers with both adaptation and evaluation utterances, sorted.

    Raises:
        ConfigError: there are none.
    """
    adapt, evals = manifest.by_speaker("adapt"), manifest.by_speaker("eval")
    speakers = sorted(set(adapt) & set(evals))
    if not speakers:
        raise ConfigError(
            f"{manifest.source}: no held-out speaker has both adapt and eval utterances"
        )
    return speakers


def measure_adaptation(
    model: nn.Module,
    manifest: Manifest,
    store: FeatureStore,
    inventory: PhoneInventory,
    cfg: AdaptConfig,
    *,
    speakers: Sequence[str] | None = None,
    max_eval_utts: int | None = None,
    slots: Sequence[str] | None = None,
    before_check: Callable[[float], None] | None = None,
) -> AdaptationResult:
    """Adapt to each held-out speaker and measure PER before/after on their eval set.

    Args:
        speakers: subset to measure (default: every held-out speaker).
        max_eval_utts: evaluate on the first N eval utterances only (default: all).
        slots: for a model without adapters, where to insert ``cfg.bottleneck`` adapters
            (default: every slot; ``[]``: none, so "after" equals "before").
        before_check: called with the mean PER before adaptation, once every speaker's is
            measured and before any adapts (it may raise to stop there: early stopping).
    """
    adapt_sets, eval_sets = manifest.by_speaker("adapt"), manifest.by_speaker("eval")
    chosen = list(speakers) if speakers is not None else heldout_speakers(manifest)
    t0 = time.monotonic()
    result = AdaptationResult()
    evals_of = {
        spk: eval_sets[spk][:max_eval_utts] if max_eval_utts else eval_sets[spk] for spk in chosen
    }
    befores = {spk: phone_error_rate(model, evals_of[spk], store, inventory) for spk in chosen}
    if before_check is not None and chosen:
        before_check(sum(befores.values()) / len(chosen))
    for spk in chosen:
        evals, before = evals_of[spk], befores[spk]
        adapted = adapt_speaker(model, adapt_sets[spk], store, inventory, cfg, slots)
        after = phone_error_rate(adapted, evals, store, inventory)
        result.speakers.append(
            SpeakerAdaptation(spk, before, after, len(adapt_sets[spk]), len(evals))
        )
    result.seconds = time.monotonic() - t0
    return result


def proxy_speakers(manifest: Manifest, n: int) -> list[str]:
    """``n`` held-out speakers spread evenly over the sorted list (deterministic)."""
    all_spk = heldout_speakers(manifest)
    n = min(n, len(all_spk))
    return [all_spk[round(i * (len(all_spk) - 1) / max(1, n - 1))] for i in range(n)]


def adaptation_proxy(
    model: nn.Module,
    manifest: Manifest,
    store: FeatureStore,
    inventory: PhoneInventory,
    adapt: AdaptConfig,
    proxy: ProxyConfig,
    *,
    slots: Sequence[str] | None = None,
    before_check: Callable[[float], None] | None = None,
) -> AdaptationResult:
    """The cheap estimate of :func:`measure_adaptation` (same adapters, fewer of everything)."""
    from dataclasses import replace

    cfg = replace(adapt, steps=proxy.steps, lr=proxy.lr)
    return measure_adaptation(
        model,
        manifest,
        store,
        inventory,
        cfg,
        speakers=proxy_speakers(manifest, proxy.n_speakers),
        max_eval_utts=proxy.max_eval_utts,
        slots=slots,
        before_check=before_check,
    )
