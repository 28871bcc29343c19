"""``apply``: the one verb that turns a base model and a Candidate into a compressed copy."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from voxfit.compress._distill import Recovery, distill
from voxfit.compress._elastic import elastic_widths, prefix_scores, recalibrate_batchnorm
from voxfit.compress._prune import magnitude_scores, prune_to_plan
from voxfit.compress._quant import (
    attach_activation_quantizers,
    attach_pair_saturation,
    calibrate,
)
from voxfit.errors import ConfigError, ModelError
from voxfit.models import MergedLoRAAdapter, StructuredModel, insert_adapters, quantize_weight
from voxfit.plan import PLAN_ATTR, Candidate


def apply(
    model: nn.Module,
    candidate: Candidate,
    *,
    channel_multiple: int = 1,
    saliency: Mapping[str, torch.Tensor] | None = None,
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    recovery: Recovery | None = None,
    pair_safe_int8: bool = False,
    int8_pair_saturation: bool = False,
    recalibrate: bool = True,
) -> nn.Module:
    """A compressed copy of ``model`` following ``candidate``; ``model`` is never changed.

    In order: structured pruning (keeping the most important channels of each group, counts
    rounded to ``channel_multiple``), per-layer weight fake-quantization, adapters inserted at
    full precision, and activation fake-quantizers calibrated on ``calibration`` batches.

    Args:
        saliency: per-group channel scores for ``importance: adaptation`` (see
            :func:`adaptation_saliency`); ignored for magnitude importance.
        calibration: (feats, lengths) batches of training data; needed when any layer has
            8-bit activations.
        recovery: training data for the candidate's ``recovery_steps`` of distillation from
            ``model`` after pruning (before quantization); needed when that is > 0. On an
            elastic model these steps polish the inherited sub-network (after its
            BatchNorm recalibration).
        pair_safe_int8: convs with 8-bit weights and activations get weights no u8 x s8
            pair instruction can saturate with (``quantize_weight(pair_safe=True)``), so
            AVX2's int8 kernels compute exactly this model; costs accuracy (measured:
            ``benchmarks/results/int8_pair_safe.json``), so off by default.
        recalibrate: a pruned sub-network of an elastic model (``train_elastic``: its
            groups are sliced as prefixes) re-estimates its BatchNorm statistics on the
            ``calibration`` batches.
        int8_pair_saturation: convs with 8-bit weights and activations compute what the
            target's int8 kernels compute when their pair instruction saturates (AVX2 without
            VNNI: ``compile.saturates_int8_pairs(profile)``), so the model's accuracy is the
            deployed library's (:func:`attach_pair_saturation`).

    Raises:
        ConfigError: a plan name the model does not have, adaptation importance without
            saliency scores, 8-bit activations without calibration data, or recovery steps
            without recovery data.
    """
    if not isinstance(model, StructuredModel):
        raise ModelError(f"{type(model).__name__} does not declare structure()")
    structure = model.structure()
    candidate.validate_names(
        (g.name for g in structure.groups),
        structure.quantizable,
        (s.name for s in structure.adapter_slots),
    )
    if channel_multiple < 1:
        raise ConfigError(f"channel_multiple: {channel_multiple} must be >= 1")
    out: nn.Module = copy.deepcopy(model)
    out.eval()
    if calibration is not None:  # read twice (BatchNorm, activations): not an iterator
        calibration = list(calibration)

    groups = {g: candidate.keep_ratio(g.name) for g in structure.groups}
    groups = {g: r for g, r in groups.items() if r < 1.0}
    if groups:
        if candidate.importance == "adaptation":
            if saliency is None:
                raise ConfigError(
                    "importance: adaptation needs saliency scores (compress.adaptation_saliency)"
                )
            missing = sorted(g.name for g in groups if g.name not in saliency)
            if missing:
                raise ConfigError(f"saliency has no scores for group(s) {', '.join(missing)}")
            scores = {g.name: saliency[g.name] for g in groups}
        else:
            scores = {g.name: magnitude_scores(out, g) for g in groups}
        # an elastic model's groups are in importance order: its sub-networks are prefixes
        elastic = elastic_widths(model) or {}
        scores.update({g.name: prefix_scores(out, g) for g in groups if g.name in elastic})
        prune_to_plan(out, groups, scores, channel_multiple)
    if candidate.recovery_steps and recovery is None:
        raise ConfigError("recovery_steps > 0 needs recovery data (recovery=Recovery(...))")
    if elastic_widths(model) and calibration is not None and recalibrate:
        # this sub-network's own BatchNorm statistics (the full width's too: a supernet
        # trained before sub-network passes stopped updating them averaged many widths); a
        # polish (recovery steps on an inherited candidate) starts from them
        recalibrate_batchnorm(out, calibration)
    if candidate.recovery_steps and recovery is not None:
        distill(out, model, candidate.recovery_steps, recovery)

    with torch.no_grad():
        for layer in candidate.layers:
            if layer.weight_bits < 32:
                module = out.get_submodule(layer.name)
                weight = module.weight
                if not isinstance(weight, torch.Tensor):
                    raise ModelError(f"layers.{layer.name}: has no weight tensor")
                pair_safe = (
                    pair_safe_int8 and layer.act_bits == 8 and isinstance(module, nn.Conv1d)
                )
                weight.copy_(quantize_weight(weight, layer.weight_bits, pair_safe=pair_safe))

    dims = candidate.adapter_dims()
    if dims:
        out = insert_adapters(out, dims, candidate.adapter_kinds())
        # a merged LoRA requantizes its layer's weight at the layer's own plan
        for target in (a.lora_target for a in structure.adapter_slots if a.lora_target):
            host = out.get_submodule(target)
            lora = getattr(host, "lora", None)
            if isinstance(lora, MergedLoRAAdapter):
                plan = candidate.layer(target)
                lora.weight_bits = plan.weight_bits
                conv = isinstance(host, nn.Conv1d)
                lora.pair_safe = pair_safe_int8 and plan.act_bits == 8 and conv

    act = {x.name: x.act_bits for x in candidate.layers if x.act_bits < 32}
    if act:
        attach_activation_quantizers(out, act)
        if any(b == 8 for b in act.values()):
            if calibration is None:
                raise ConfigError("8-bit activations need calibration batches (calibration=...)")
            if calibrate(out, calibration) == 0:
                raise ConfigError("calibration gave no batches")
        if int8_pair_saturation:
            both8 = (x.name for x in candidate.layers if (x.weight_bits, x.act_bits) == (8, 8))
            attach_pair_saturation(out, both8)
    setattr(out, PLAN_ATTR, candidate)
    return out
