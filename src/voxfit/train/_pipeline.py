"""Checkpoints, cached base-model training and the foundation evaluation report.

The base model is trained once per (corpus manifest, model config, train config): its folder
name is a hash of the three, so re-running ``voxfit train`` reuses it. Evaluation results are
cached the same way beside the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voxfit import __version__
from voxfit.data import FeatureConfig, FeatureStore, Manifest, PhoneInventory
from voxfit.errors import ConfigError, ModelError
from voxfit.metrics import phone_error_rate
from voxfit.models import (
    ELASTIC_ATTR,
    FactoryConfig,
    ModelConfig,
    build_from_config,
    config_for,
    config_from_dict,
    count_parameters,
    insert_adapters,
    model_name,
    n_mels_of,
)
from voxfit.train._adapt import SpeakerAdaptation, measure_adaptation
from voxfit.train._loop import AdaptConfig, TrainConfig, train_base

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "voxfit-checkpoint"
CHECKPOINT_VERSION = 1

TRAIN_PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(epochs=12, max_minutes=3.0, max_batch_s=20.0, lr=3e-3),
    "default": TrainConfig(),
}
ADAPT_PRESETS: dict[str, AdaptConfig] = {
    "tiny": AdaptConfig(bottleneck=4, steps=10, max_batch_s=10.0),
    "default": AdaptConfig(),
}


def _preset(table: dict[str, Any], name: str, what: str) -> Any:
    if name not in table:
        raise ConfigError(f"unknown {what} preset {name!r} (choose from {', '.join(table)})")
    return table[name]


def train_preset(name: str) -> TrainConfig:
    """Training settings of a preset (``tiny`` for tests, ``default``)."""
    return _preset(TRAIN_PRESETS, name, "training")  # type: ignore[no-any-return]


def adapt_preset(name: str) -> AdaptConfig:
    """Adaptation settings of a preset."""
    return _preset(ADAPT_PRESETS, name, "adaptation")  # type: ignore[no-any-return]


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def manifest_hash(manifest: Manifest) -> str:
    """sha256 (first 16 hex) of the manifest file's bytes: the corpus identity."""
    return hashlib.sha256(manifest.source.read_bytes()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A loaded base model with what produced it."""

    model: nn.Module
    config: ModelConfig | FactoryConfig
    inventory: PhoneInventory
    meta: dict[str, Any]
    path: Path


def save_checkpoint(
    path: Path,
    model: nn.Module,
    cfg: ModelConfig | FactoryConfig,
    inventory: PhoneInventory,
    meta: dict[str, Any],
) -> None:
    """Write a checkpoint (tensors + plain data only, so it loads with weights_only=True)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model_config": asdict(cfg),
            "inventory": list(inventory.phones),
            "state_dict": model.state_dict(),
            "meta": meta,
        },
        tmp,
    )
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises:
        ModelError: missing file, not a voxfit checkpoint, an unsupported version, or a
            model config / weights this voxfit cannot build (one line naming the file).
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: checkpoint not found")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise ModelError(f"{p}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{p}: not a voxfit checkpoint")
    if raw.get("version") != CHECKPOINT_VERSION:
        raise ModelError(f"{p}: checkpoint version {raw.get('version')} is not supported")
    try:
        cfg = config_from_dict(raw["model_config"])
        model = build_from_config(cfg)
        model.load_state_dict(raw["state_dict"])
        inventory = PhoneInventory(tuple(raw["inventory"]))
        meta = raw["meta"]
        if meta.get(ELASTIC_ATTR) is not None:  # a supernet: apply slices its prefixes
            setattr(model, ELASTIC_ATTR, dict(meta[ELASTIC_ATTR]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        why = " ".join(str(e).split())[:120]
        raise ModelError(f"{p}: not a checkpoint this voxfit can load ({why})") from None
    model.eval()
    return Checkpoint(model, cfg, inventory, meta, p)


def feature_store(
    manifest: Manifest, cache_dir: str | os.PathLike[str], model: nn.Module | str, size: str
) -> FeatureStore:
    """The features ``model`` takes (a module, or a family / factory name built at ``size``
    to ask): its ``n_mels`` log-mel bins (``voxfit.models.n_mels_of``), cached per manifest
    and settings under ``cache_dir``."""
    if isinstance(model, str):
        model = build_from_config(config_for(model, 2, size))
    return FeatureStore(manifest, cache_dir, FeatureConfig(n_mels=n_mels_of(model)))


def train_cached(
    manifest: Manifest,
    store: FeatureStore,
    kind: str,
    size: str,
    train_cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
) -> Path:
    """Train the base model for this corpus and settings, or reuse the cached one.

    ``kind``: a family (``tdnn``, ``conformer``) or a factory (``module:function``,
    :func:`voxfit.models.build_named`).

    Returns:
        Path of ``checkpoint.pt`` under ``out_dir/<name>-<hash>/`` (name: the family or the
        factory's function).
    """
    inventory = PhoneInventory.from_sequences(u.phones for u in manifest.utterances)
    cfg = config_for(kind, inventory.size, size)
    key = _digest(manifest_hash(manifest), asdict(cfg), asdict(train_cfg), store.key)
    path = Path(out_dir) / f"{model_name(cfg)}-{key}" / "checkpoint.pt"
    if path.exists():
        log.info("reusing trained model %s", path)
        return path
    model = build_from_config(cfg)
    hist = train_base(
        model, manifest.split("train"), store, inventory, train_cfg, dev_utts=manifest.split("dev")
    )
    save_checkpoint(
        path,
        model,
        cfg,
        inventory,
        {
            "corpus_hash": manifest_hash(manifest),
            "manifest": str(manifest.source),
            "train_config": asdict(train_cfg),
            "epoch_loss": hist.epoch_loss,
            "train_minutes": hist.minutes,
            "steps": hist.steps,
            "n_params": count_parameters(model),
            "voxfit_version": __version__,
            "torch_version": str(torch.__version__),
        },
    )
    return path


@dataclass(slots=True)
class FoundationReport:
    """The figures the foundation issue asks for; PER in percent."""

    dev_per: float
    heldout_per_before: float
    heldout_per_after: float
    relative_reduction: float
    adapter_params: int
    n_params: int
    adapter_param_fraction: float
    train_minutes: float
    adapt_seconds: float
    n_train_speakers: int
    n_heldout_speakers: int
    speakers: list[SpeakerAdaptation] = field(default_factory=list)
    checkpoint: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    ckpt: Checkpoint, manifest: Manifest, store: FeatureStore, adapt_cfg: AdaptConfig
) -> FoundationReport:
    """Dev PER, and per held-out speaker PER before/after adapter-only adaptation.

    Raises:
        ConfigError: the manifest has no held-out speakers (splits adapt/eval).
    """
    if ckpt.meta.get("corpus_hash") != manifest_hash(manifest):
        log.warning("checkpoint was trained on another manifest than %s", manifest.source)
    model, inv = ckpt.model, ckpt.inventory
    dev_per = phone_error_rate(model, manifest.split("dev"), store, inv)
    res = measure_adaptation(model, manifest, store, inv, adapt_cfg)
    slots = [s.name for s in model.structure().adapter_slots]  # type: ignore[operator]
    adapter_params = count_parameters(
        insert_adapters(model, dict.fromkeys(slots, adapt_cfg.bottleneck))
    ) - count_parameters(model)
    rows = res.speakers
    for r in rows:
        log.info("%s: PER %.2f%% -> %.2f%%", r.speaker, r.per_before, r.per_after)
    before_mean, after_mean = res.per_before, res.per_after
    n_params = count_parameters(model)
    return FoundationReport(
        dev_per=dev_per,
        heldout_per_before=before_mean,
        heldout_per_after=after_mean,
        relative_reduction=(before_mean - after_mean) / before_mean if before_mean else 0.0,
        adapter_params=adapter_params,
        n_params=n_params,
        adapter_param_fraction=adapter_params / n_params,
        train_minutes=float(ckpt.meta.get("train_minutes", 0.0)),
        adapt_seconds=res.seconds,
        n_train_speakers=len(manifest.speakers("train")),
        n_heldout_speakers=len(rows),
        speakers=rows,
        checkpoint=str(ckpt.path),
    )


def evaluate_cached(
    ckpt: Checkpoint, manifest: Manifest, store: FeatureStore, adapt_cfg: AdaptConfig
) -> FoundationReport:
    """:func:`evaluate`, cached in ``eval-<hash>.json`` beside the checkpoint."""
    key = _digest(manifest_hash(manifest), asdict(adapt_cfg), ckpt.path.stat().st_mtime_ns)
    path = ckpt.path.parent / f"eval-{key}.json"
    if path.exists():
        raw = json.loads(path.read_text())
        raw["speakers"] = [SpeakerAdaptation(**r) for r in raw["speakers"]]
        return FoundationReport(**raw)
    report = evaluate(ckpt, manifest, store, adapt_cfg)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2))
    os.replace(tmp, path)
    return report
