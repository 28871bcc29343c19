"""Compile a (compressed) model for a hardware profile: the parent-side API.

The model is exported here with ``torch.export`` at a fixed input length per profile input
(static shapes: MetaSchedule tunes concrete shapes, and a phone runs fixed-size chunks),
as the deployed graph: feats (1, T, n_mels) -> log-probs. Convolutions with 8-bit activations
and <= 8-bit weights become ``voxfit::qconv1d`` ops (int8 compute where the target allows,
see ``_qops``); other activation fake-quantizers are off (weights keep their quantized
values). The TVM work runs in a :class:`TvmWorker`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voxfit.compile._qops import lower_int8_layers, lower_weight_convs
from voxfit.compile._runner import runner_spec
from voxfit.compile._worker import TvmWorker
from voxfit.errors import ConfigError
from voxfit.hw_profiles import HardwareProfile, InputSpec
from voxfit.models import has_unmerged_lora, merge_adapters, n_mels_of


@dataclass(frozen=True, slots=True)
class CompileResult:
    """One profile input compiled to a library, or the reason it was not (``error``).

    ``new_tasks`` counts the fused TVM tasks this candidate added to the profile's tuning
    database (the ones that cost tuning time); ``n_tasks`` all distinct tasks it has.
    """

    profile: str
    input: str
    frames: int
    lib: Path | None = None
    n_mels: int = 80  # the input's feature bins: (1, frames, n_mels)
    n_tasks: int = 0
    new_tasks: int = 0
    tuned_trials: int = 0
    export_s: float = 0.0
    tune_s: float = 0.0
    build_s: float = 0.0
    total_s: float = 0.0
    memory_bytes: int | None = None
    # bytes of the constants (the weights) the library carries, as compiled
    weight_bytes: int | None = None
    task_names: tuple[str, ...] = ()
    lowering: str = "fp32"
    exported: bool = True
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None and self.lib is not None


class _Affine(nn.Module):
    """An eval-mode BatchNorm1d as ``x * scale + shift`` per channel (fuses into the conv)."""

    def __init__(self, bn: nn.BatchNorm1d) -> None:
        super().__init__()
        if bn.running_var is None or bn.running_mean is None:
            raise ValueError("BatchNorm1d without running statistics cannot be deployed")
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach()
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach()
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", scale[:, None].clone())
        self.register_buffer("shift", shift[:, None].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _fold_batchnorm(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm1d):
            setattr(model, name, _Affine(child))
        else:
            _fold_batchnorm(child)


class _Deploy(nn.Module):
    """feats (1, T, n_mels) -> log-probs: the graph a device runs (lengths = all frames).

    Wraps an eval-mode *copy* of the model whose BatchNorms became per-channel affines, so
    TVM fuses them into the preceding conv's epilogue instead of running a separate
    normalization kernel.
    """

    def __init__(self, model: nn.Module, pack: bool = True) -> None:
        super().__init__()
        # merged LoRA adapters become their layer's weight (merge_adapters copies the model
        # when there are any; a model without them is copied here)
        merged = merge_adapters(model)
        self.model = (copy.deepcopy(model) if merged is model else merged).eval()
        _fold_batchnorm(self.model)
        # 8-bit-activation convs and linears become one int8 op each (voxfit::qconv1d,
        # voxfit::qlinear), which the TVM importer lowers to int8 compute where it can run
        self.int8_layers = lower_int8_layers(self.model, int8_layers(model))
        # 4/8/16-bit weights with float activations: one op each, whose weights the TVM
        # importer keeps packed in the library and unpacks inside the kernel
        self.packed_layers = lower_weight_convs(self.model, packed_convs(model) if pack else {})

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # a model whose forward takes lengths=None for "every frame valid" masks nothing
        lengths = None
        if not getattr(self.model, "lengths_optional", False):
            lengths = torch.full((feats.shape[0],), feats.shape[1], dtype=torch.long)
        log_probs, _ = self.model(feats, lengths)
        return log_probs  # type: ignore[no-any-return]


@contextmanager
def _deploy_mode(model: nn.Module) -> Iterator[None]:
    """Activation fake-quant off (the ONNX exporter's helper) and eval mode, then restored."""
    from voxfit.compress import fake_quant_off

    was = model.training
    model.eval()
    try:
        with fake_quant_off(model):
            yield
    finally:
        model.train(was)


def export_program(
    model: nn.Module, frames: int, path: str | Path, n_mels: int = 80, *, pack: bool = True
) -> Path:
    """Save the deploy graph of ``model`` for (1, frames, n_mels) input as a torch.export file
    (``pack=False``: weight-only quantized convs keep float32 weights; :func:`packed_convs`)."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _deploy_mode(model), torch.no_grad():
        ep = torch.export.export(_Deploy(model, pack), (torch.zeros(1, frames, n_mels),))
    tmp = dst.with_suffix(".tmp.pt2")
    torch.export.save(ep, tmp)
    tmp.replace(dst)
    return dst


def int8_layers(model: nn.Module) -> dict[str, int]:
    """The plan's layers that lower to int8 compute (name -> weight bits): ungrouped,
    zero-padded Conv1d layers and Linear layers with calibrated 8-bit activations, 4- or
    8-bit weights and no LoRA branch beside them (a ``merged_lora`` adapter is part of the
    weight, so its layer lowers). Others (depthwise convs, ``lora`` targets) keep float
    compute with their quantized values."""
    from voxfit.models import ActivationQuantizer
    from voxfit.plan import plan_of

    def lowers(layer: nn.Module) -> bool:
        if not isinstance(getattr(layer, "act_quant", None), ActivationQuantizer):
            return False
        if has_unmerged_lora(layer):
            return False
        if isinstance(layer, nn.Linear):
            return True
        return (
            isinstance(layer, nn.Conv1d)
            and layer.groups == 1
            and layer.padding_mode == "zeros"
            and isinstance(layer.padding, tuple)
        )

    return {
        x.name: x.weight_bits
        for x in plan_of(model).layers
        if x.act_bits == 8 and x.weight_bits in (4, 8) and lowers(model.get_submodule(x.name))
    }


def packed_convs(model: nn.Module) -> dict[str, int]:
    """The plan's layers whose weights stay packed in the TVM library (name -> weight bits):
    ungrouped, zero-padded Conv1d layers with 4-, 8- or 16-bit weights that do not lower to
    int8 ops (:func:`int8_layers`) and carry no ``lora`` branch (it reads the float
    weight's input through a hook). Other low-bit layers keep their quantized values in
    float32."""
    from voxfit.plan import plan_of

    int8 = int8_layers(model)

    def packs(layer: nn.Module) -> bool:
        return (
            isinstance(layer, nn.Conv1d)
            and layer.groups == 1
            and layer.padding_mode == "zeros"
            and isinstance(layer.padding, tuple)
            and not has_unmerged_lora(layer)
        )

    return {
        x.name: x.weight_bits
        for x in plan_of(model).layers
        if x.weight_bits in (4, 8, 16)
        and x.name not in int8
        and packs(model.get_submodule(x.name))
    }


def lowering_of(
    model: nn.Module, int8_built: dict[str, Any] | None = None, *, pack: bool = True
) -> str:
    """How the plan's low bit-widths are compiled (said in every result, per the design).

    Layers with 8-bit activations and <= 8-bit weights (convolutions, linear layers) are
    exported as int8 ops (see :func:`int8_layers`); the TVM build says whether they ran as
    int8 compute on the target (``int8_built``: the build's ``int8`` report, which then
    describes them). Layers
    with 4/8/16-bit weights and float activations keep their weights packed in the library
    and unpack them inside the kernel (:func:`packed_convs`). Every other low-bit layer keeps
    its quantized weight *values* and computes in float32: it buys neither size nor latency.
    """
    from voxfit.plan import plan_of

    layers = plan_of(model).layers
    int8 = int8_layers(model)
    packed = packed_convs(model) if pack else {}
    done = set(int8) | set(packed)
    low = sorted(
        {f"w{x.weight_bits}" for x in layers if x.weight_bits < 32 and x.name not in done}
        | {f"a{x.act_bits}" for x in layers if x.act_bits < 32 and x.name not in int8}
    )
    parts = [f"{len(int8)} layers as int8 ops"] if int8 else []
    if int8_built:
        parts = [_int8_said(int8_built)]
    if packed:
        kinds = "/".join(f"w{b}" for b in sorted(set(packed.values())))
        parts.append(f"{len(packed)} {kinds} layers packed, unpacked in the kernel")
    if low:
        parts.append(f"{'/'.join(low)} layers run dequantized in float32")
    return "; ".join(parts) or "fp32"


def _int8_said(int8: dict[str, Any]) -> str:
    n, note = int8["layers"], int8["note"]
    if int8["compute"] == "int8":
        return f"{n} layers int8 compute ({int8.get('product', 'u8 x s8')} -> s32; {note})"
    return f"{n} int8 layers run dequantized in float32, inputs not rounded ({note})"


def default_tuning_dir(work: str | Path, profile: HardwareProfile) -> Path:
    """The user's tuning database of ``profile`` under a work folder: ``<work>/tuning/<name>``.

    Pass it as :func:`compile_model`'s ``tuning_dir`` from everything that shares one work
    folder, so a task tuned once (by a search, a collection, an export) is found by all.
    """
    return Path(work) / "tuning" / profile.name


def seed_database_dir(
    profile: HardwareProfile, cost_models_dir: str | Path = "cost_models"
) -> Path | None:
    """The shipped database of the profile named by ``tuning.seed_from`` (None without one).

    Raises:
        ConfigError: no profile of that name.
    """
    if not profile.tuning.seed_from:
        return None
    from voxfit.hw_profiles import find_profile, load_profile

    try:
        seed = load_profile(find_profile(profile.tuning.seed_from))
    except ConfigError as e:
        raise ConfigError(f"{profile.source or profile.name}: tuning.seed_from: {e}") from None
    return seed.database_dir(cost_models_dir)


def compile_model(
    model: nn.Module,
    profile: HardwareProfile,
    worker: TvmWorker,
    out_dir: str | Path,
    *,
    inputs: tuple[InputSpec, ...] | None = None,
    cost_models_dir: str | Path = "cost_models",
    tuning_dir: str | Path | None = None,
    tune: bool = True,
    export: bool = True,
    timeout_s: float | None = None,
    retune_trials: int = 0,
    pack: bool = True,
    tune_seeded: bool = False,
) -> list[CompileResult]:
    """Compile ``model`` for each of the profile's ``inputs`` (default: all of them).

    Two tuning databases are read: the profile's shipped one
    (``profile.database_dir(cost_models_dir)``, read-only: nothing is written there, and a
    torn one is an error naming it) and the user's, ``tuning_dir``, which takes every new
    record and MetaSchedule's logs (default: ``default_tuning_dir(Path(out_dir).parent,
    profile)``, i.e. ``<out_dir>/../tuning/<profile>``, beside the caller's other builds;
    pass :func:`default_tuning_dir` of the work folder to share it more widely). The same
    folder for both makes one writable database (to grow the shipped records on purpose).

    Tasks neither database has are tuned first (all of one input's new tasks in one
    MetaSchedule run, ``trials_per_task`` each, measured where the profile measures: see
    :func:`~voxfit.compile.runner_spec`) unless ``tune`` is False. With ``export=False`` no
    library file is linked: the executable stays in the worker for a local measurement
    (``lib`` names it; ~2 s saved per candidate). Never raises for a build failure: the
    result carries ``error``. ``retune_trials`` > 0 tunes every task that many more trials,
    tuned before or not, starting from the best records of either database (the shipped
    ones are copied into the user's first). ``pack=False`` compiles weight-only quantized
    convs with float32 weights (their quantized values), to compare with the packed library.

    A profile with ``tuning.seed_from`` also reads that profile's shipped database, as a
    fallback: its schedules (tuned on another device of the ISA family) serve the tasks this
    device has no record of. When ``tune`` is set, the seed's best few schedules of such a
    task are first measured on this device and kept as its records
    (``details["seed_measured_tasks"]``), so every schedule the library picks was timed
    here; a task none of whose seed schedules runs here is tuned. ``tune_seeded`` tunes the
    seeded tasks on this device too, starting from those records (onboarding may).
    ``details["seeded_tasks"]`` names the tasks the library runs with the seed's schedules
    unmeasured (``tune=False``).
    """
    out = Path(out_dir)
    results = []
    lowering = lowering_of(model, pack=pack)
    shipped = profile.database_dir(cost_models_dir)
    user = Path(tuning_dir) if tuning_dir is not None else default_tuning_dir(out.parent, profile)
    runner = runner_spec(profile).to_dict()
    seed = seed_database_dir(profile, cost_models_dir)
    for spec in inputs or profile.inputs:
        t0 = time.monotonic()
        base: dict[str, Any] = dict(
            profile=profile.name, input=spec.name, frames=spec.frames, lowering=lowering,
            n_mels=n_mels_of(model),
        )  # fmt: skip
        try:
            program = export_program(
                model, spec.frames, out / f"{spec.name}.pt2", n_mels_of(model), pack=pack
            )
        except Exception as e:  # noqa: BLE001 - an unexportable model is a failed candidate
            results.append(CompileResult(**base, error=f"torch.export failed: {e}"[:500]))
            continue
        export_s = time.monotonic() - t0
        r = worker.call(
            "build",
            timeout_s=timeout_s,
            program=str(program),
            profile=profile.to_dict(),
            db_dir=str(user.resolve()),
            shipped_db_dir=str(shipped.resolve()),
            seed_db_dir=str(seed.resolve()) if seed is not None else None,
            tune_seeded=tune_seeded,
            runner=runner,
            tune=tune,
            export=export,
            lib_out=str((out / f"{spec.name}.so").resolve()),
            retune_trials=retune_trials,
        )
        total = time.monotonic() - t0
        if "error" in r:
            results.append(
                CompileResult(**base, export_s=export_s, total_s=total, error=r["error"])
            )
            continue
        if "int8" in r:  # what the build made of the int8 ops on this target
            base["lowering"] = lowering_of(model, r["int8"], pack=pack)
        results.append(
            CompileResult(
                **base,
                lib=Path(r["lib"]),
                n_tasks=r["n_tasks"],
                new_tasks=r["new_tasks"],
                tuned_trials=r["tuned_trials"],
                export_s=export_s,
                tune_s=r["tune_s"],
                build_s=r["build_s"],
                total_s=total,
                memory_bytes=r["memory_bytes"],
                weight_bytes=sum(r["constant_bytes"].values()) if "constant_bytes" in r else None,
                task_names=tuple(r["task_names"]),
                exported=r["exported"],
                details={
                    k: r[k]
                    for k in (
                        "convert_s",
                        "import",
                        "import_fallback",
                        "db_repair",
                        "new_task_names",
                        "seeded_records",
                        "seeded_tasks",
                        "seed_measured_tasks",
                        "seed_measured_records",
                        "seed_measure_s",
                        "seed_measure_errors",
                        "task_keys",
                        "tuner",
                        "db_load_s",
                        "compile_relax_s",
                        "memory_plan_s",
                        "export_library_s",
                        "constant_bytes",
                        "int8",
                    )
                    if k in r
                },
            )
        )
    return results


def saturates_int8_pairs(profile: HardwareProfile) -> bool:
    """Whether the int8 convs built for ``profile`` sum u8 x s8 products in saturating int16
    pairs (``vpmaddubsw``: AVX2, and AVX-512BW without VNNI), so a compressed model computes
    what they compute only with ``compress.apply(..., int8_pair_saturation=True)``. Imports
    TVM (its target parser knows each CPU's features)."""
    from voxfit.compile._import import make_target
    from voxfit.compile._int8 import intrin_of, saturates_pairs

    # no intrinsic ("": int8 not tensorized or not built) saturates nothing
    return saturates_pairs(intrin_of(make_target(profile.to_dict())))
