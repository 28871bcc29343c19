"""The acoustic model family and its declared compressible structure."""

from voxfit.models._adapters import (
    Adapter,
    AdapterKind,
    LoRAAdapter,
    ResidualAdapter,
    adapter_parameters,
    freeze_backbone,
    insert_adapters,
)
from voxfit.models._family import (
    OUTPUT_LENGTHS,
    OUTPUT_STRIDE,
    ConformerLiteCtc,
    ModelConfig,
    ModelKind,
    TdnnCtc,
    build_model,
    count_parameters,
    default_config,
)
from voxfit.models._quantizer import ActivationQuantizer
from voxfit.models._structure import (
    AdapterSlot,
    ChannelGroup,
    ChannelMember,
    ModelStructure,
    StructuredModel,
    group_size,
    prune_group,
    validate_structure,
)

__all__ = [
    "OUTPUT_LENGTHS",
    "OUTPUT_STRIDE",
    "ActivationQuantizer",
    "Adapter",
    "AdapterKind",
    "LoRAAdapter",
    "AdapterSlot",
    "ChannelGroup",
    "ChannelMember",
    "ConformerLiteCtc",
    "ModelConfig",
    "ModelKind",
    "ModelStructure",
    "ResidualAdapter",
    "StructuredModel",
    "TdnnCtc",
    "adapter_parameters",
    "build_model",
    "count_parameters",
    "default_config",
    "freeze_backbone",
    "group_size",
    "insert_adapters",
    "prune_group",
    "validate_structure",
]
