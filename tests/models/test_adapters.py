from __future__ import annotations

import pytest
import torch
from torch import nn

from voxfit.errors import ModelError
from voxfit.models import (
    ResidualAdapter,
    adapter_parameters,
    build_model,
    default_config,
    freeze_backbone,
    insert_adapters,
)


@pytest.mark.parametrize("kind", ["tdnn", "conformer"])
def test_fresh_adapters_leave_outputs_unchanged_and_input_model_untouched(kind: str) -> None:
    torch.manual_seed(0)
    m = build_model(default_config(kind, 10, "tiny")).eval()
    x, lens = torch.randn(2, 40, 80), torch.tensor([40, 33])
    y0, _ = m(x, lens)
    slots = [s.name for s in m.structure().adapter_slots]
    a = insert_adapters(m, {slots[0]: 4, slots[-1]: 8})
    torch.testing.assert_close(a(x, lens)[0], y0)
    assert sum(isinstance(mod, ResidualAdapter) for mod in a.modules()) == 2
    assert not any(isinstance(mod, ResidualAdapter) for mod in m.modules())
    # Once trained (non-zero up-projection) the adapter changes the output.
    for p in adapter_parameters(a):
        nn.init.normal_(p, std=0.5)
    assert not torch.allclose(a(x, lens)[0], y0)


def test_freeze_backbone_leaves_only_adapters_trainable() -> None:
    m = build_model(default_config("tdnn", 10, "tiny"))
    a = insert_adapters(m, {"blocks.0": 4, "blocks.1": 0})
    freeze_backbone(a)
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable == {
        "blocks.0.adapter.down.weight",
        "blocks.0.adapter.down.bias",
        "blocks.0.adapter.up.weight",
        "blocks.0.adapter.up.bias",
    }


def test_unknown_slot_is_rejected() -> None:
    m = build_model(default_config("tdnn", 10, "tiny"))
    with pytest.raises(ModelError, match=r"unknown adapter slot\(s\) \['blocks.9'\]"):
        insert_adapters(m, {"blocks.9": 4})


def test_model_without_structure_is_rejected() -> None:
    with pytest.raises(ModelError, match="does not declare structure"):
        insert_adapters(nn.Linear(2, 2), {"x": 1})


@pytest.mark.parametrize("kind", ["tdnn", "conformer"])
def test_lora_starts_as_identity_and_trains_only_low_rank_factors(kind: str) -> None:
    from voxfit.models import LoRAAdapter

    torch.manual_seed(0)
    m = build_model(default_config(kind, 10, "tiny")).eval()
    x, lens = torch.randn(2, 40, 80), torch.tensor([40, 33])
    y0, _ = m(x, lens)
    slot = m.structure().adapter_slots[1]
    a = insert_adapters(m, {slot.name: 3}, {slot.name: "lora"})
    torch.testing.assert_close(a(x, lens)[0], y0)
    loras = [mod for mod in a.modules() if isinstance(mod, LoRAAdapter)]
    assert len(loras) == 1
    assert a.get_submodule(slot.lora_target + ".lora") is loras[0]
    freeze_backbone(a)
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{slot.lora_target}.lora.down.weight",
        f"{slot.lora_target}.lora.up.weight",
    }
    nn.init.normal_(loras[0].up.weight, std=0.5)
    assert not torch.allclose(a(x, lens)[0], y0)
    # the hook survives a deep copy (adaptation trains copies)
    import copy

    torch.testing.assert_close(copy.deepcopy(a)(x, lens)[0], a(x, lens)[0])
