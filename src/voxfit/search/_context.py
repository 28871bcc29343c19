"""Everything one search evaluates candidates against: corpus, features, base model, data
for calibration/recovery, and the adaptation settings -- made (or reused) once per search."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voxfit.data import FeatureStore, Manifest, PhoneInventory
from voxfit.errors import ConfigError
from voxfit.plan import Candidate
from voxfit.train import AdaptConfig, ProxyConfig

log = logging.getLogger(__name__)


@dataclass
class SearchContext:
    manifest: Manifest
    store: FeatureStore
    inventory: PhoneInventory
    base: nn.Module
    checkpoint: Path
    adapt: AdaptConfig
    proxy: ProxyConfig
    preset: str
    model_kind: str = "tdnn"
    calibration: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    recovery: Any = None
    builds: Path | None = None  # cache of distilled candidates (state dicts), see build()
    _saliency: dict[str, torch.Tensor] | None = None

    @classmethod
    def of_study(cls, study: Any, work: str | Path = "work") -> SearchContext:
        """The context a study was searched in: its corpus (preset or manifest), model
        family and base checkpoint, from the study's attributes; ``work`` for caches.

        Raises:
            ConfigError: the study records no checkpoint.
        """
        attrs = study.user_attrs
        if not attrs.get("checkpoint"):
            raise ConfigError(f"study {study.study_name!r}: no checkpoint recorded")
        return cls.prepare(
            preset=attrs.get("preset", "default"),
            model=attrs.get("model", "tdnn"),
            work=work,
            manifest=attrs.get("manifest"),
            checkpoint=Path(attrs["checkpoint"]),
        )

    @classmethod
    def prepare(
        cls,
        *,
        preset: str = "default",
        model: str = "tdnn",
        work: str | Path = "work",
        manifest: str | Path | None = None,
        checkpoint: str | Path | None = None,
    ) -> SearchContext:
        """Make (or reuse) the corpus, features and trained base model under ``work``
        (``checkpoint``: use this trained model instead of the preset's cached one)."""
        from voxfit.compress import Recovery
        from voxfit.data import batches, collate, load_manifest, make_corpus
        from voxfit.data import preset as corpus_preset
        from voxfit.train import (
            adapt_preset,
            feature_store,
            load_checkpoint,
            train_cached,
            train_preset,
        )

        work = Path(work)
        path = Path(manifest) if manifest else make_corpus(corpus_preset(preset), work / "corpus")
        man = load_manifest(path)
        features = work / "models" / "features"
        if checkpoint is not None:
            ckpt_path = Path(checkpoint)
            ckpt = load_checkpoint(ckpt_path)
            store = feature_store(man, features, ckpt.model, preset)
        else:
            store = feature_store(man, features, model, preset)
            ckpt_path = train_cached(
                man, store, model, preset, train_preset(preset), work / "models"
            )
            ckpt = load_checkpoint(ckpt_path)
        inv = ckpt.inventory
        groups = list(batches(man.split("train"), 30.0))
        calib = [(b.feats, b.lengths) for b in (collate(g, store, inv) for g in groups[::40][:4])]
        return cls(
            manifest=man,
            store=store,
            inventory=inv,
            base=ckpt.model.eval(),
            checkpoint=ckpt_path,
            adapt=adapt_preset(preset),
            proxy=ProxyConfig(),
            preset=preset,
            model_kind=model,
            calibration=calib,
            recovery=Recovery(man.split("train"), store, inv),
            builds=work / "models" / "builds",
        )

    def with_checkpoint(self, checkpoint: str | Path) -> SearchContext:
        """This context for another trained model of the same corpus (the elastic supernet
        of its base): corpus, features and calibration batches are kept, not re-made.

        Raises:
            ConfigError: the checkpoint's phone inventory is not this context's.
        """
        from voxfit.train import load_checkpoint

        ckpt = load_checkpoint(Path(checkpoint))
        if ckpt.inventory != self.inventory:
            raise ConfigError(
                f"{checkpoint}: its phone inventory differs from {self.checkpoint}'s: "
                "not a model of this corpus"
            )
        return replace(self, base=ckpt.model.eval(), checkpoint=Path(checkpoint), _saliency=None)

    def saliency(self) -> dict[str, torch.Tensor]:
        from voxfit.compress import adaptation_saliency

        if self._saliency is None:
            self._saliency = adaptation_saliency(
                self.base,
                self.manifest.by_speaker("adapt"),
                self.store,
                self.inventory,
                replace(self.adapt, steps=30),
            )
        return self._saliency

    def build(
        self,
        cand: Candidate,
        channel_multiple: int,
        seed: int,
        *,
        int8_pair_saturation: bool = False,
    ) -> nn.Module:
        """The compressed model of ``cand`` (deterministic for a seed); with
        ``int8_pair_saturation`` (``compile.saturates_int8_pairs`` of the profile) its int8
        convs compute what the target's int8 kernels compute (``compress.apply``).

        Distillation is the expensive part of a build (minutes), so a candidate with
        ``recovery_steps`` is cached under ``builds`` as a state dict keyed by the base
        checkpoint, the plan, the seed, the channel multiple and the recovery recipe (learning
        rate, temperature, KD weight, batch seconds, seed, number of training utterances):
        a later build of the same trial (export, re-measurement) rebuilds the architecture
        without recovery and loads the weights. A cache file that does not load is ignored
        and rebuilt.
        """
        from voxfit.compress import apply

        def make(c: Candidate) -> nn.Module:
            torch.manual_seed(seed)
            return apply(
                self.base,
                c,
                channel_multiple=channel_multiple,
                saliency=self.saliency() if c.importance == "adaptation" else None,
                calibration=self.calibration,
                recovery=self.recovery,
                int8_pair_saturation=int8_pair_saturation,
            )

        path = self._build_path(cand, channel_multiple, seed, int8_pair_saturation)
        if path is None:
            return make(cand)
        if path.is_file():
            model = make(replace(cand, recovery_steps=0))
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state, strict=True)
                return model.eval()
            except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
                log.warning("build cache %s not used (%s); rebuilding", path, e)
        model = make(cand)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: workers sharing ``work`` may build the same plan
        tmp = path.with_suffix(f".{os.getpid()}.partial")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
        return model

    def _build_path(
        self, cand: Candidate, channel_multiple: int, seed: int, saturation: bool = False
    ) -> Path | None:
        if self.builds is None or self.recovery is None or not cand.recovery_steps:
            return None
        r = self.recovery
        recipe = [r.lr, r.temperature, r.kd_weight, r.max_batch_s, r.seed, len(r.train_utts)]
        ckpt = self.checkpoint.resolve()
        parts = [str(ckpt), ckpt.stat().st_mtime_ns, cand.stable_hash(), seed, channel_multiple]
        if saturation:  # the distillation trained through the kernels' saturation
            parts.append("int8-pair-saturation")
        key = hashlib.sha256(json.dumps([*parts, recipe]).encode()).hexdigest()[:16]
        return self.builds / f"{key}.pt"

    def adaptation_data(self) -> dict[str, Any]:
        """Which held-out speakers' data the accuracy proxy uses: per speaker the file names
        of the adaptation utterances it adapts to and the evaluation utterances it scores,
        and a sha256 of the whole (the audit log's record of users' data, no audio)."""
        from voxfit.train import proxy_speakers

        speakers = proxy_speakers(self.manifest, self.proxy.n_speakers)
        adapt, evals = self.manifest.by_speaker("adapt"), self.manifest.by_speaker("eval")
        n_eval = self.proxy.max_eval_utts or None
        sets = {
            s: {
                "adapt": [Path(u.path).name for u in adapt.get(s, [])],
                "eval": [Path(u.path).name for u in evals.get(s, [])[:n_eval]],
            }
            for s in speakers
        }
        digest = hashlib.sha256(json.dumps(sets, sort_keys=True).encode()).hexdigest()
        return {"speakers": speakers, "sets": sets, "sha256": digest}

    def accuracy(
        self,
        model: nn.Module,
        *,
        full: bool = False,
        before_check: Callable[[float, float], None] | None = None,
    ) -> dict[str, Any]:
        """Dev PER, and PER before/after adapting to held-out speakers (the proxy unless
        ``full``: every held-out speaker with the product's adaptation settings).
        ``before_check(dev_per, pre_adapt_per)`` runs before any adaptation and may raise
        to stop there (early stopping)."""
        from voxfit.metrics import phone_error_rate
        from voxfit.train import adaptation_proxy, measure_adaptation

        t0 = time.monotonic()
        dev = phone_error_rate(model, self.manifest.split("dev"), self.store, self.inventory)
        dev_s = time.monotonic() - t0
        check = None if before_check is None else (lambda pre: before_check(dev, pre))
        if full:
            res = measure_adaptation(
                model, self.manifest, self.store, self.inventory, self.adapt, slots=[],
                before_check=check,
            )  # fmt: skip
        else:
            res = adaptation_proxy(
                model, self.manifest, self.store, self.inventory, self.adapt, self.proxy,
                slots=[], before_check=check,
            )  # fmt: skip
        return {
            "dev_per": dev,
            "pre_adapt_per": res.per_before,
            "post_adapt_per": res.per_after,
            "adapt_gain": res.gain,
            "per_speaker": {
                s.speaker: [round(s.per_before, 3), round(s.per_after, 3)] for s in res.speakers
            },
            "adaptation": "full" if full else "proxy",
            "dev_s": dev_s,
            "adapt_s": res.seconds,
        }
