"""The acoustic model family: a conv/TDNN and a Conformer-lite CTC encoder.

Both map log-mel features (batch, frames, n_mels) to phone log-probabilities at half the
frame rate (20 ms), and declare their compressible structure in ``structure()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from voxfit.errors import ConfigError
from voxfit.models._attention import attention, split_heads_attention
from voxfit.models._structure import (
    AdapterSlot,
    ChannelGroup,
    ChannelMember,
    ModelStructure,
    validate_structure,
)
from voxfit.structure import FAMILIES

ModelKind = Literal["tdnn", "conformer"]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of one family member. ``n_outputs`` includes the CTC blank."""

    kind: ModelKind
    n_outputs: int
    n_mels: int = 80
    channels: int = 192  # residual stream width (tdnn) / model dim (conformer)
    hidden: int = 256  # tdnn block width / conformer FFN width
    n_blocks: int = 6
    kernel_size: int = 5  # tdnn temporal kernel / conformer depthwise kernel
    heads: int = 4  # conformer only
    dropout: float = 0.1
    schema_version: int = 1


# Output frames per input frame: the stem's stride (both models). A bundle's frontend.json
# states the output frame shift from it (input hop x OUTPUT_STRIDE, 20 ms).
OUTPUT_STRIDE = 2
OUTPUT_LENGTHS = "floor((lengths - 1) / 2) + 1"  # what _out_lengths computes, for bundles


def _out_lengths(lengths: torch.Tensor) -> torch.Tensor:
    # Stem: kernel 5, stride OUTPUT_STRIDE, padding 2 (both models).
    return torch.div(lengths + 4 - 5, OUTPUT_STRIDE, rounding_mode="floor") + 1


class _TdnnBlock(nn.Module):
    def __init__(self, c: int, h: int, k: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c, h, k, dilation=dilation, padding=dilation * (k - 1) // 2)
        self.bn1 = nn.BatchNorm1d(h)
        self.conv2 = nn.Conv1d(h, c, 1)
        self.bn2 = nn.BatchNorm1d(c)
        self.adapter: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor, drop: nn.Module) -> torch.Tensor:
        y = drop(F.relu(self.bn1(self.conv1(x))))
        return self.adapter(F.relu(x + self.bn2(self.conv2(y))))  # type: ignore[no-any-return]


class TdnnCtc(nn.Module):
    """Residual dilated 1-D conv (TDNN) encoder with a CTC head.

    Block i: ``x = relu(x + bn2(conv2(relu(bn1(conv1(x))))))`` then its adapter slot, where
    conv1 is a k-tap dilated conv from ``channels`` to ``hidden`` and conv2 is 1x1 back.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_mels = cfg.n_mels  # the input features it takes (voxfit.models.n_mels_of)
        c, h, k = cfg.channels, cfg.hidden, cfg.kernel_size
        self.stem = nn.Conv1d(cfg.n_mels, c, 5, stride=OUTPUT_STRIDE, padding=2)
        self.stem_bn = nn.BatchNorm1d(c)
        self.blocks = nn.ModuleList(
            _TdnnBlock(c, h, k, dilation=(1, 2, 3)[i % 3]) for i in range(cfg.n_blocks)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Conv1d(c, cfg.n_outputs, 1)

    def structure(self) -> ModelStructure:
        n = len(self.blocks)
        stream = [ChannelMember("stem", "out"), ChannelMember("stem_bn", "norm")]
        groups = []
        for i in range(n):
            p = f"blocks.{i}"
            stream += [
                ChannelMember(f"{p}.conv1", "in"),
                ChannelMember(f"{p}.conv2", "out"),
                ChannelMember(f"{p}.bn2", "norm"),
            ]
            groups.append(
                ChannelGroup(
                    f"{p}.hidden",
                    (
                        ChannelMember(f"{p}.conv1", "out"),
                        ChannelMember(f"{p}.bn1", "norm"),
                        ChannelMember(f"{p}.conv2", "in"),
                    ),
                )
            )
        stream.append(ChannelMember("head", "in"))
        return ModelStructure(
            groups=(ChannelGroup("stream", tuple(stream)), *groups),
            quantizable=(
                "stem",
                *(f"blocks.{i}.conv{j}" for i in range(n) for j in (1, 2)),
                "head",
            ),
            adapter_slots=tuple(
                AdapterSlot(
                    f"blocks.{i}",
                    f"blocks.{i}.adapter",
                    "stream",
                    "BCT",
                    lora_target=f"blocks.{i}.conv2",
                )
                for i in range(n)
            ),
        )

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.stem_bn(self.stem(feats.transpose(1, 2))))
        for b in self.blocks:
            x = b(x, self.drop)
        logits = self.head(self.drop(x)).transpose(1, 2)
        return F.log_softmax(logits, dim=-1), _out_lengths(lengths)


class _FeedForward(nn.Module):
    def __init__(self, d: int, f: int, p: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.silu(self.fc1(self.norm(x)))))


class _SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections, so heads can be pruned."""

    def __init__(self, d: int, heads: int, p: float) -> None:
        super().__init__()
        if d % heads:
            raise ConfigError(f"model channels {d} must be divisible by heads {heads}")
        self.head_dim = d // heads
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.p = p

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        n_heads = self.q.out_features // self.head_dim  # shrinks when heads are pruned
        if pad is None:  # every frame valid (the deploy graph): one op, nothing masked
            return self.o(attention(q, k, v, n_heads))  # type: ignore[no-any-return]
        mask = ~pad[:, None, None, :]  # True = attend
        dropout = self.p if self.training else 0.0
        return self.o(split_heads_attention(q, k, v, n_heads, mask, dropout))  # type: ignore[no-any-return]


class _ConvModule(nn.Module):
    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pw_a = nn.Linear(d, d)  # GLU value and gate as two layers: prunable together
        self.pw_gate = nn.Linear(d, d)
        self.dw = nn.Conv1d(d, d, k, padding=k // 2, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.pw_out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(x)
        h = self.pw_a(h) * torch.sigmoid(self.pw_gate(h))
        if pad is not None:
            h = h.masked_fill(pad[..., None], 0.0)
        h = h.transpose(1, 2)
        h = F.silu(self.bn(self.dw(h))).transpose(1, 2)
        return self.pw_out(h)


class _ConformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.channels
        self.ff1 = _FeedForward(d, cfg.hidden, cfg.dropout)
        self.attn = _SelfAttention(d, cfg.heads, cfg.dropout)
        self.conv = _ConvModule(d, cfg.kernel_size)
        self.ff2 = _FeedForward(d, cfg.hidden, cfg.dropout)
        self.norm = nn.LayerNorm(d)
        self.adapter: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None, drop: nn.Module) -> torch.Tensor:
        x = x + 0.5 * drop(self.ff1(x))
        x = x + drop(self.attn(x, pad))
        x = x + drop(self.conv(x, pad))
        x = x + 0.5 * drop(self.ff2(x))
        return self.adapter(self.norm(x))  # type: ignore[no-any-return]


class ConformerLiteCtc(nn.Module):
    """A small Conformer CTC encoder: macaron FFNs, MHSA, depthwise conv module per block."""

    #: ``forward`` takes ``lengths=None`` for "every frame valid": the deploy graph then
    #: masks nothing and runs each attention layer as one ``voxfit::attention`` op
    lengths_optional: ClassVar[bool] = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_mels = cfg.n_mels
        d = cfg.channels
        self.stem = nn.Conv1d(cfg.n_mels, d, 5, stride=OUTPUT_STRIDE, padding=2)
        self.stem_norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(_ConformerBlock(cfg) for _ in range(cfg.n_blocks))
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(d, cfg.n_outputs)

    def structure(self) -> ModelStructure:
        stream = [ChannelMember("stem", "out"), ChannelMember("stem_norm", "norm")]
        groups: list[ChannelGroup] = []
        quant: list[str] = ["stem"]
        for i in range(len(self.blocks)):
            p = f"blocks.{i}"
            for ff in ("ff1", "ff2"):
                stream += [
                    ChannelMember(f"{p}.{ff}.norm", "norm"),
                    ChannelMember(f"{p}.{ff}.fc1", "in"),
                    ChannelMember(f"{p}.{ff}.fc2", "out"),
                ]
                groups.append(
                    ChannelGroup(
                        f"{p}.{ff}",
                        (
                            ChannelMember(f"{p}.{ff}.fc1", "out"),
                            ChannelMember(f"{p}.{ff}.fc2", "in"),
                        ),
                    )
                )
                quant += [f"{p}.{ff}.fc1", f"{p}.{ff}.fc2"]
            a = f"{p}.attn"
            stream += [ChannelMember(f"{a}.norm", "norm"), ChannelMember(f"{a}.o", "out")]
            stream += [ChannelMember(f"{a}.{n}", "in") for n in ("q", "k", "v")]
            groups.append(
                ChannelGroup(
                    f"{a}.heads",
                    (
                        *(ChannelMember(f"{a}.{n}", "out") for n in ("q", "k", "v")),
                        ChannelMember(f"{a}.o", "in"),
                    ),
                    unit=self.cfg.channels // self.cfg.heads,
                )
            )
            quant += [f"{a}.{n}" for n in ("q", "k", "v", "o")]
            c = f"{p}.conv"
            stream += [
                ChannelMember(f"{c}.norm", "norm"),
                ChannelMember(f"{c}.pw_a", "in"),
                ChannelMember(f"{c}.pw_gate", "in"),
                ChannelMember(f"{c}.pw_out", "out"),
                ChannelMember(f"{p}.norm", "norm"),
            ]
            groups.append(
                ChannelGroup(
                    f"{c}.channels",
                    (
                        ChannelMember(f"{c}.pw_a", "out"),
                        ChannelMember(f"{c}.pw_gate", "out"),
                        ChannelMember(f"{c}.dw", "depthwise"),
                        ChannelMember(f"{c}.bn", "norm"),
                        ChannelMember(f"{c}.pw_out", "in"),
                    ),
                )
            )
            quant += [f"{c}.pw_a", f"{c}.pw_gate", f"{c}.dw", f"{c}.pw_out"]
        stream.append(ChannelMember("head", "in"))
        quant.append("head")
        return ModelStructure(
            groups=(ChannelGroup("stream", tuple(stream)), *groups),
            quantizable=tuple(quant),
            adapter_slots=tuple(
                AdapterSlot(
                    f"blocks.{i}",
                    f"blocks.{i}.adapter",
                    "stream",
                    "BTC",
                    lora_target=f"blocks.{i}.ff2.fc2",
                )
                for i in range(len(self.blocks))
            ),
        )

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``lengths`` None: every frame of every utterance is valid, so nothing is masked
        (the deploy graph, ``lengths_optional``)."""
        x = self.stem_norm(F.relu(self.stem(feats.transpose(1, 2))).transpose(1, 2))
        pad: torch.Tensor | None = None
        if lengths is None:
            out_lens = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        else:
            out_lens = _out_lengths(lengths)
            pad = torch.arange(x.shape[1], device=x.device)[None, :] >= out_lens[:, None]
        for b in self.blocks:
            x = b(x, pad, self.drop)
        return F.log_softmax(self.head(self.drop(x)), dim=-1), out_lens


def build_model(cfg: ModelConfig) -> TdnnCtc | ConformerLiteCtc:
    """Instantiate a family member and validate its structure declaration.

    Raises:
        ConfigError: unknown kind or inconsistent sizes.
    """
    match cfg.kind:
        case "tdnn":
            model: TdnnCtc | ConformerLiteCtc = TdnnCtc(cfg)
        case "conformer":
            model = ConformerLiteCtc(cfg)
        case _:
            raise ConfigError(f"unknown model kind {cfg.kind!r} (choose tdnn or conformer)")
    validate_structure(model, model.structure())
    return model


def default_config(kind: str, n_outputs: int, size: Literal["tiny", "default"]) -> ModelConfig:
    """The shipped architecture of ``kind`` at a size preset ("tiny" is for tests)."""
    if kind not in FAMILIES:
        raise ConfigError(f"unknown model kind {kind!r} (choose tdnn or conformer)")
    if size == "tiny":
        return ModelConfig(kind, n_outputs, channels=32, hidden=48, n_blocks=2, heads=2)  # type: ignore[arg-type]
    if kind == "tdnn":
        return ModelConfig("tdnn", n_outputs, channels=256, hidden=256, n_blocks=5, kernel_size=3)
    return ModelConfig(
        "conformer", n_outputs, channels=144, hidden=576, n_blocks=4, kernel_size=15, heads=4
    )


def n_mels_of(model: nn.Module) -> int:
    """The log-mel bins ``model`` takes: its ``n_mels`` attribute (the families set it; a
    user's model may declare it), else 80."""
    return int(getattr(model, "n_mels", 80))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
