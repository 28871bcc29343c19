"""An elastic (once-for-all) base model: one training run, every sub-width usable as it is.

The channels of each elastic group are first put in importance order (a permutation: the
model computes exactly what it did), so a sub-width is a prefix of the group. Training then
follows the sandwich rule: each step trains the full model on the CTC loss and, against its
frame posteriors (in-place distillation), the smallest sub-network and a few random ones.
A sub-network is the full model with the group's channels past the prefix masked at every
consumer (``in`` member): for groups without a LayerNorm member that is exactly the
physically sliced model (``apply`` slices the prefix of an elastic model), which
:func:`masked` lets tests and training run without copying weights. BatchNorm statistics
seen by many widths are recalibrated per candidate (``apply`` with calibration batches).
For a space whose candidates compute in int8 end to end (one shared 8-bit activation
width), half the sub-network passes run that chain fake-quantized (``int8_layers``), so
inherited int8 candidates are trained for their quantization as well as their widths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from voxfit._progress import progress_bar
from voxfit.compress._prune import kept_channels, magnitude_scores
from voxfit.data import FeatureStore, Manifest, PhoneInventory, Utterance, batches, collate
from voxfit.errors import ConfigError, ModelError
from voxfit.metrics import phone_error_rate
from voxfit.models import (
    ELASTIC_ATTR,
    ActivationQuantizer,
    ChannelGroup,
    group_size,
    quantize_weight,
    reorder_group,
)
from voxfit.train import TrainConfig
from voxfit.train._loop import _lr, _spec_augment

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ElasticConfig:
    """Which widths the supernet learns and how.

    ``widths``: elastic group name -> the keep ratios a space can choose (a group with one
    choice, 1.0, is not elastic). ``random_subnets``: sandwich members per step besides the
    full and the smallest. Counts round like a candidate's (``channel_multiple``).
    """

    widths: Mapping[str, tuple[float, ...]]
    random_subnets: int = 2
    channel_multiple: int = 8
    temperature: float = 1.0
    seed: int = 0
    schema_version: int = 1
    #: layers that compute in int8 together in the space's candidates (one shared 8-bit
    #: activation width: :func:`int8_layers_of_space`). A sub-network pass runs them
    #: fake-quantized (8-bit weights per output channel, uint8 inputs; straight-through
    #: gradients) with probability ``int8_share``, so an inherited int8 candidate gets
    #: weights trained for its quantization, not only for its widths. Empty: float passes.
    int8_layers: tuple[str, ...] = ()
    int8_share: float = 0.5

    def cache_key(self) -> dict[str, Any]:
        """What names the trained supernet (the int8 fields only when set, so supernets
        trained before they existed keep their cache names)."""
        out = {**asdict(self), "widths": {k: list(v) for k, v in self.widths.items()}}
        if not self.int8_layers:
            del out["int8_layers"], out["int8_share"]
        else:
            out["int8_layers"] = list(self.int8_layers)
        return out


@dataclass(slots=True)
class ElasticHistory:
    """Losses per epoch (full model; mean of the sub-networks' distillation), wall time."""

    full_loss: list[float] = field(default_factory=list)
    sub_loss: list[float] = field(default_factory=list)
    minutes: float = 0.0
    steps: int = 0
    int8_passes: int = 0  # sub-network passes run fake-quantized (ElasticConfig.int8_layers)


def elastic_groups(model: nn.Module, widths: Mapping[str, Sequence[float]]) -> list[ChannelGroup]:
    """The declared groups ``widths`` names with a choice below 1.0, checked maskable.

    Raises:
        ConfigError: an unknown group, or one with a LayerNorm member (masking channels
            changes a LayerNorm's statistics, so a masked sub-network would not be the sliced
            one: such a group, the conformer's stream, is not elastic).
    """
    structure = model.structure()  # type: ignore[operator]
    by_name = {g.name: g for g in structure.groups}
    out = []
    for name, ratios in widths.items():
        if name not in by_name:
            raise ConfigError(f"elastic widths: {name!r} is not a channel group of the model")
        if not ratios or min(ratios) >= 1.0:
            continue
        g = by_name[name]
        for m in g.members:
            if isinstance(model.get_submodule(m.module), nn.LayerNorm):
                raise ConfigError(
                    f"elastic widths: {name!r} has a LayerNorm member ({m.module}): not elastic"
                )
        out.append(g)
    return out


def widths_of_space(bound: Any) -> dict[str, tuple[float, ...]]:
    """The elastic widths a bound search space offers (its groups with a choice < 1.0)."""
    return {g: tuple(sorted(r)) for g, r in bound.groups.items() if min(r) < 1.0}


def int8_layers_of_space(bound: Any) -> tuple[str, ...]:
    """The layers a bound space runs in int8 together: with one activation width shared by
    every layer (``shared_act_bits``), those that can take 8 bits. A space drawing widths
    per layer has no such chain (its candidates mix int8 and float layers): none."""
    if not bound.space.shared_act_bits:
        return ()
    return tuple(sorted(n for n, bits in bound.act_bits.items() if 8 in bits))


def order_by_importance(model: nn.Module, groups: Sequence[ChannelGroup]) -> None:
    """Permute each group's channels (in place) into descending magnitude importance, whole
    units for unit groups: the model's function is unchanged, a prefix is the top-k."""
    for g in groups:
        s = magnitude_scores(model, g)
        if g.unit > 1:
            units = torch.argsort(s.reshape(-1, g.unit).sum(1), descending=True, stable=True)
            order = (units[:, None] * g.unit + torch.arange(g.unit)).reshape(-1)
        else:
            order = torch.argsort(s, descending=True, stable=True)
        reorder_group(model, g, order)


def prefix_widths(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    ratios: Mapping[str, float],
    channel_multiple: int,
) -> dict[str, int]:
    """Channels each group keeps at ``ratios`` (as ``apply`` rounds them)."""
    return {
        g.name: kept_channels(group_size(model, g), g.unit, ratios[g.name], channel_multiple)
        for g in groups
    }


def _input_widths(
    model: nn.Module, groups: Sequence[ChannelGroup], widths: Mapping[str, int]
) -> dict[str, int]:
    """The input channels each consumer keeps in the sub-network of ``widths`` (masked
    ones only): module name -> its prefix (the smallest, for a consumer of two groups)."""
    out: dict[str, int] = {}
    for g in groups:
        k = widths.get(g.name)
        if k is None or k >= group_size(model, g):
            continue
        for m in g.members:
            if m.side == "in":
                out[m.module] = min(k, out.get(m.module, k))
    return out


@contextmanager
def masked(
    model: nn.Module, groups: Sequence[ChannelGroup], widths: Mapping[str, int]
) -> Iterator[nn.Module]:
    """Within the block ``model`` computes its sub-network of ``widths`` (channels per
    group, a prefix): every consumer of a group sees only its first ``widths[name]``
    channels. The hooks are removed on exit, also after an exception."""
    handles = []
    try:
        for name, k in _input_widths(model, groups, widths).items():
            mod = model.get_submodule(name)
            dim = 1 if isinstance(mod, nn.Conv1d) else -1
            handles.append(mod.register_forward_pre_hook(_mask_hook(k, dim)))
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Within the block BatchNorms normalize with batch statistics (in training mode) but
    leave their running statistics as they are; restored on exit."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom


def _mask_hook(k: int, dim: int) -> Any:
    def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        mask = torch.zeros(x.shape[dim], dtype=x.dtype, device=x.device)
        mask[:k] = 1.0
        shape = [1] * x.dim()
        shape[dim] = -1
        return (x * mask.reshape(shape), *args[1:])

    return hook


def _int8_weight(w: torch.Tensor, k: int | None) -> torch.Tensor:
    """``w`` fake-quantized to 8 bits as ``apply`` quantizes the sliced layer (per output
    channel over its first ``k`` input channels; the rest meet masked zeros), with a
    straight-through gradient."""
    if k is None:
        q = quantize_weight(w.detach(), 8)
    else:
        q = torch.cat([quantize_weight(w.detach()[:, :k], 8), w.detach()[:, k:]], dim=1)
    return w + (q - w).detach()


def _int8_input(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A layer's input on the uint8 grid of its own range (a candidate's is calibrated on
    data: the same grid, up to the range), straight-through (ActivationQuantizer's)."""
    x = args[0]
    quant = ActivationQuantizer(8)
    quant.lo, quant.hi = x.detach().min(), x.detach().max()
    return (quant(x), *args[1:])


def subnet_forward(
    model: nn.Module,
    feats: torch.Tensor,
    lengths: torch.Tensor,
    groups: Sequence[ChannelGroup],
    widths: Mapping[str, int],
    int8_layers: Sequence[str] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sub-network of ``widths`` run on a batch (:func:`masked`), with ``int8_layers``
    computing on 8-bit weights and uint8 inputs (fake-quantized, straight-through)."""
    with masked(model, groups, widths):
        if not int8_layers:
            return model(feats, lengths)  # type: ignore[no-any-return]
        keep = _input_widths(model, groups, widths)
        handles = [
            model.get_submodule(n).register_forward_pre_hook(_int8_input) for n in int8_layers
        ]
        try:
            weights = {
                f"{n}.weight": _int8_weight(model.get_parameter(f"{n}.weight"), keep.get(n))
                for n in int8_layers
            }
            out = torch.func.functional_call(model, weights, (feats, lengths))
            return out  # type: ignore[no-any-return]
        finally:
            for h in handles:
                h.remove()


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches_: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches_`` (cumulative average),
    leaving everything else as it is; returns the number of BatchNorm layers."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches_:
        return 0
    was = model.training
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for feats, lengths in batches_:
            model(feats, lengths)
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        model.train(was)
    return len(bns)


def _kd(
    student: torch.Tensor, teacher: torch.Tensor, lens: torch.Tensor, t: float
) -> torch.Tensor:
    """Mean per-frame KL(teacher || student) at temperature ``t`` over valid frames."""
    s = F.log_softmax(student / t, dim=-1)
    q = F.log_softmax(teacher / t, dim=-1)
    kl = F.kl_div(s, q, log_target=True, reduction="none").sum(-1)  # (B, T)
    valid = torch.arange(kl.shape[1])[None, :] < lens[:, None]
    return (kl * valid).sum() / valid.sum().clamp_min(1) * t * t


def train_elastic(
    model: nn.Module,
    train_utts: Sequence[Utterance],
    store: FeatureStore,
    inventory: PhoneInventory,
    cfg: TrainConfig,
    elastic: ElasticConfig,
    dev_utts: Sequence[Utterance] = (),
) -> ElasticHistory:
    """Train ``model`` (in place; a trained base or a fresh one) as an elastic supernet over
    ``elastic.widths``: channels ordered by importance (not those of a model that is already
    elastic: training goes on with its prefixes), then the sandwich rule each step
    (full model on CTC, the smallest and ``random_subnets`` random sub-networks distilled
    from the full model's posteriors). Same schedule and time cap as :func:`train_base`.
    Marks the model (``ELASTIC_ATTR``) so ``apply`` slices prefixes.

    Raises:
        ConfigError: no training utterances, or widths naming no elastic group.
    """
    if not train_utts:
        raise ConfigError("no training utterances (split 'train' is empty)")
    groups = elastic_groups(model, elastic.widths)
    if not groups:
        raise ConfigError("elastic widths: no group has a width below 1.0")
    if not 0.0 <= elastic.int8_share <= 1.0:
        raise ConfigError(f"int8_share: {elastic.int8_share} is not a probability in [0, 1]")
    for name in elastic.int8_layers:  # an unknown layer fails here, not mid-training
        try:
            model.get_parameter(f"{name}.weight")
        except AttributeError:
            raise ConfigError(f"int8_layers: {name!r} is not a layer of the model") from None
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if elastic_widths(model) is None:
        order_by_importance(model, groups)
    else:  # a supernet trained on: its prefixes are its sub-networks, reordering loses them
        log.info("continuing an elastic model: its channel order (prefixes) kept")
    rng = random.Random(elastic.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    choices = {gr.name: tuple(elastic.widths[gr.name]) for gr in groups}
    smallest = prefix_widths(
        model, groups, {n: min(r) for n, r in choices.items()}, elastic.channel_multiple
    )
    steps_per_epoch = sum(1 for _ in batches(train_utts, cfg.max_batch_s))
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist = ElasticHistory()
    start = time.monotonic()
    model.train()
    with progress_bar(info=True) as bar:
        task = bar.add_task("elastic training", total=total, info="")
        progress = 0.0
        for epoch in range(cfg.epochs):
            full_l, sub_l = [], []
            for group in batches(train_utts, cfg.max_batch_s, rng):
                progress = max(
                    hist.steps / total, (time.monotonic() - start) / 60 / cfg.max_minutes
                )
                if progress >= 1.0:
                    break
                for pg in opt.param_groups:
                    pg["lr"] = _lr(cfg, progress)
                b = collate(group, store, inventory)
                feats = _spec_augment(b.feats, b.lengths, g) if cfg.spec_augment else b.feats
                opt.zero_grad(set_to_none=True)
                lp, lens = model(feats, b.lengths)
                loss = F.ctc_loss(
                    lp.transpose(0, 1), b.targets, lens, b.target_lengths, blank=0,
                    reduction="mean", zero_infinity=True,
                )  # fmt: skip
                loss.backward()
                teacher = lp.detach()
                subs = [smallest] + [
                    prefix_widths(
                        model,
                        groups,
                        {n: rng.choice(r) for n, r in choices.items()},
                        elastic.channel_multiple,
                    )
                    for _ in range(elastic.random_subnets)
                ]
                sub_losses = []
                for widths in subs:
                    # drawn only for a space with an int8 chain (the same draws otherwise)
                    int8 = bool(elastic.int8_layers) and rng.random() < elastic.int8_share
                    hist.int8_passes += int8
                    # the running statistics stay the full model's (sub-networks
                    # recalibrate their own when a candidate is built)
                    with frozen_bn_stats(model):
                        s_lp, _ = subnet_forward(
                            model, feats, b.lengths, groups, widths,
                            elastic.int8_layers if int8 else (),
                        )  # fmt: skip
                    kd = _kd(s_lp, teacher, lens, elastic.temperature)
                    kd.backward()
                    sub_losses.append(kd.item())
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                hist.steps += 1
                full_l.append(loss.item())
                sub_l.append(sum(sub_losses) / len(sub_losses))
                bar.update(
                    task,
                    advance=1,
                    info=f"epoch {epoch + 1} ctc {full_l[-1]:.3f} kd {sub_l[-1]:.3f}",
                )
            if full_l:
                hist.full_loss.append(sum(full_l) / len(full_l))
                hist.sub_loss.append(sum(sub_l) / len(sub_l))
                msg = (
                    f"epoch {epoch + 1}: ctc {hist.full_loss[-1]:.3f}, kd {hist.sub_loss[-1]:.3f}"
                )
                if dev_utts and (epoch % 4 == 3 or progress >= 1.0 or epoch == cfg.epochs - 1):
                    model.eval()
                    msg += f", dev PER {phone_error_rate(model, dev_utts, store, inventory):.2f}%"
                    model.train()
                log.info(msg)
            if progress >= 1.0:
                log.warning(
                    "stopped in epoch %d: max_minutes=%s reached", epoch + 1, cfg.max_minutes
                )
                break
    hist.minutes = (time.monotonic() - start) / 60
    model.eval()
    setattr(model, ELASTIC_ATTR, {n: list(r) for n, r in choices.items()})
    return hist


def elastic_widths(model: nn.Module) -> dict[str, list[float]] | None:
    """The elastic groups and ratios a model was trained for (None: not elastic)."""
    w = getattr(model, ELASTIC_ATTR, None)
    if w is None:
        return None
    if not isinstance(w, dict):
        raise ModelError(f"{ELASTIC_ATTR}: expected a mapping of group -> ratios, got {w!r}")
    return w


def prefix_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Scores that make ``prune_to_plan`` keep a prefix: the first channel scores highest."""
    n = group_size(model, group)
    return torch.arange(n, 0, -1, dtype=torch.float32) / max(1, n) + math.ulp(1.0)


#: the elastic phase after the base's own training (progressive: full width first, then
#: the sandwich; each step costs the full model and 1 + random_subnets sub-networks).
#: default: the measured recipe of benchmarks/results/elastic.json (24 epochs, capped at 80
#: minutes: it stopped in epoch 18, 1131 steps; inherited candidates then matched distilled
#: ones, dev_per_delta_mean -0.02). 8 epochs (528 steps) left them 1.14 dev PER behind.
ELASTIC_PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(epochs=6, max_minutes=2.0, max_batch_s=20.0, lr=2e-3, warmup=0.05),
    "default": TrainConfig(epochs=24, max_minutes=80.0, lr=1e-3, warmup=0.05),
}


def train_elastic_cached(
    base_checkpoint: Path,
    manifest: Manifest,
    store: FeatureStore,
    elastic: ElasticConfig,
    cfg: TrainConfig,
) -> Path:
    """The elastic supernet trained from ``base_checkpoint`` over ``elastic.widths``, or the
    cached one (``<base folder>-elastic-<hash>/checkpoint.pt``: keyed by the base file, the
    widths and both configs). Its meta says it is elastic (``ELASTIC_ATTR``)."""
    from voxfit.train import load_checkpoint, manifest_hash, save_checkpoint

    base = Path(base_checkpoint).resolve()
    key_parts = [str(base), base.stat().st_mtime_ns, asdict(cfg), elastic.cache_key()]
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:12]
    path = base.parent.with_name(f"{base.parent.name}-elastic-{key}") / "checkpoint.pt"
    if path.exists():
        log.info("reusing elastic model %s", path)
        return path
    ckpt = load_checkpoint(base)
    model = ckpt.model
    hist = train_elastic(
        model,
        manifest.split("train"),
        store,
        ckpt.inventory,
        cfg,
        elastic,
        dev_utts=manifest.split("dev"),
    )
    meta = {
        **ckpt.meta,
        "corpus_hash": manifest_hash(manifest),
        ELASTIC_ATTR: {k: list(v) for k, v in elastic.widths.items()},
        "elastic": {
            "from_checkpoint": str(base),
            "train_config": asdict(cfg),
            "elastic_config": key_parts[3],
            "full_loss": hist.full_loss,
            "sub_loss": hist.sub_loss,
            "minutes": hist.minutes,
            "steps": hist.steps,
            "int8_passes": hist.int8_passes,
            "order": "magnitude",
        },
    }
    save_checkpoint(path, model, ckpt.config, ckpt.inventory, meta)
    return path


def elastic_for_space(
    base_checkpoint: Path,
    manifest: Manifest,
    store: FeatureStore,
    bound: Any,
    preset: str,
    *,
    max_minutes: float | None = None,
    epochs: int | None = None,
) -> Path:
    """The elastic supernet of ``base_checkpoint`` over the widths that ``bound`` (a bound
    space) can choose, trained with the preset's elastic recipe (``max_minutes`` / ``epochs``
    override it) or reused from the cache (:func:`train_elastic_cached`).

    Raises:
        ConfigError: the space chooses no width below 1.0, or the preset has no recipe.
    """
    from dataclasses import replace

    widths = widths_of_space(bound)
    if not widths:
        raise ConfigError(f"{bound.space.source}: no group has a width below 1.0 to make elastic")
    if preset not in ELASTIC_PRESETS:
        raise ConfigError(
            f"--preset: no elastic recipe for {preset!r} ({sorted(ELASTIC_PRESETS)})"
        )
    cfg = ELASTIC_PRESETS[preset]
    if max_minutes is not None:
        cfg = replace(cfg, max_minutes=max_minutes)
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    elastic = ElasticConfig(widths=widths, int8_layers=int8_layers_of_space(bound))
    return train_elastic_cached(base_checkpoint, manifest, store, elastic, cfg)
