"""Compression: structured pruning, mixed-precision fake quantization, adapters.

``apply(model, candidate)`` is the one verb; importance scores and quantizers are exposed
for sensitivity analysis and tests, ``ActivationQuantizer`` and
``fake_quant_off`` for what lowers a compressed model (compile, bundles).
"""

from voxfit.compress._apply import apply
from voxfit.compress._distill import Recovery, distill
from voxfit.compress._elastic import (
    ELASTIC_PRESETS,
    ElasticConfig,
    elastic_for_space,
    elastic_widths,
    int8_layers_of_space,
    masked,
    recalibrate_batchnorm,
    subnet_forward,
    train_elastic,
    train_elastic_cached,
    widths_of_space,
)
from voxfit.compress._export import (
    ORT_SESSION_CONFIG,
    OnnxExport,
    export_onnx,
    export_onnx_static_int8,
    ort_session,
)
from voxfit.compress._prune import kept_channels, magnitude_scores, prune_to_plan, taylor_scores
from voxfit.compress._quant import (
    ActivationQuantizer,
    attach_activation_quantizers,
    attach_pair_saturation,
    calibrate,
    fake_quant_off,
    pair_saturation_excess,
    pair_saturation_off,
)
from voxfit.compress._saliency import adaptation_saliency
from voxfit.compress._sensitivity import SensitivityConfig, save_sensitivity, sensitivity
from voxfit.models import quantize_weight

__all__ = [
    "ELASTIC_PRESETS",
    "ElasticConfig",
    "elastic_for_space",
    "elastic_widths",
    "int8_layers_of_space",
    "masked",
    "subnet_forward",
    "recalibrate_batchnorm",
    "train_elastic",
    "train_elastic_cached",
    "widths_of_space",
    "ActivationQuantizer",
    "OnnxExport",
    "ORT_SESSION_CONFIG",
    "ort_session",
    "export_onnx",
    "export_onnx_static_int8",
    "Recovery",
    "distill",
    "SensitivityConfig",
    "save_sensitivity",
    "sensitivity",
    "adaptation_saliency",
    "apply",
    "attach_activation_quantizers",
    "attach_pair_saturation",
    "calibrate",
    "fake_quant_off",
    "kept_channels",
    "magnitude_scores",
    "pair_saturation_excess",
    "pair_saturation_off",
    "prune_to_plan",
    "quantize_weight",
    "taylor_scores",
]
