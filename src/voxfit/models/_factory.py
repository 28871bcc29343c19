"""Models named by reference: a shipped family (``tdnn``, ``conformer``) or a user's factory.

A factory is ``package.module:function``; ``function(n_outputs=..., size=...)`` returns a
torch module that satisfies :class:`~voxfit.models.StructuredModel` (``structure()`` and
``forward(feats, lengths)`` over log-mel features; an ``n_mels`` attribute when they are
not 80 bins: voxfit computes that many). ``size`` is the preset's name (``tiny``
for tests, ``default``); a factory may ignore it. The module is imported from the current
folder first (as ``uvicorn app:app`` does), then from the installed packages.

A checkpoint records the reference and these arguments (:class:`FactoryConfig`), so every
command that rebuilds the base (search, export, workers) rebuilds the same architecture.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from voxfit.errors import ConfigError, ModelError
from voxfit.models._family import ModelConfig, build_model, default_config
from voxfit.models._structure import StructuredModel, validate_structure
from voxfit.structure import FAMILIES, is_factory


@dataclass(frozen=True, slots=True)
class FactoryConfig:
    """A user model's recipe: its factory and the arguments it was called with."""

    factory: str
    n_outputs: int
    size: str = "default"
    kind: str = "factory"


def check_model_ref(ref: str, what: str = "--model") -> str:
    """``ref`` if it is a family name or a factory reference, else a one-line ConfigError."""
    if ref in FAMILIES or is_factory(ref):
        return ref
    raise ConfigError(
        f"{what}: {ref!r} is neither a model family ({', '.join(FAMILIES)}) nor a factory "
        "(package.module:function)"
    )


def _import_factory(ref: str) -> Callable[..., Any]:
    mod_name, fn_name = ref.split(":")
    cwd = os.getcwd()
    if cwd not in sys.path:  # the user's own module, beside where they run voxfit
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"model factory {ref}: cannot import {mod_name} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"model factory {ref}: {mod_name} has no function {fn_name}")
    return fn  # type: ignore[no-any-return]


def config_for(ref: str, n_outputs: int, size: str) -> ModelConfig | FactoryConfig:
    """The recipe of ``ref`` at ``n_outputs`` classes and a size preset."""
    check_model_ref(ref)
    if ref in FAMILIES:
        return default_config(ref, n_outputs, "tiny" if size == "tiny" else "default")
    return FactoryConfig(ref, n_outputs, size)


def build_from_config(cfg: ModelConfig | FactoryConfig) -> nn.Module:
    """Instantiate a recipe and validate its structure declaration.

    Raises:
        ConfigError: the factory cannot be imported or called with these arguments.
        ModelError: what it returns is not a structured model, or its declaration is wrong.
    """
    if isinstance(cfg, ModelConfig):
        return build_model(cfg)
    fn = _import_factory(cfg.factory)
    try:
        model = fn(n_outputs=cfg.n_outputs, size=cfg.size)
    except TypeError as e:
        raise ConfigError(
            f"model factory {cfg.factory}: must accept (n_outputs=, size=) ({e})"
        ) from None
    if not isinstance(model, nn.Module) or not isinstance(model, StructuredModel):
        raise ModelError(
            f"model factory {cfg.factory}: returned {type(model).__name__}, not a torch "
            "module with structure() and forward(feats, lengths)"
        )
    validate_structure(model, model.structure())
    return model


def build_named(ref: str, n_outputs: int, size: str = "default") -> nn.Module:
    """The model ``ref`` names (family or factory), built fresh."""
    return build_from_config(config_for(ref, n_outputs, size))


def config_from_dict(raw: dict[str, Any]) -> ModelConfig | FactoryConfig:
    """A checkpoint's ``model_config`` back as a recipe."""
    if raw.get("kind") == "factory":
        return FactoryConfig(**raw)
    return ModelConfig(**raw)


def model_name(cfg: ModelConfig | FactoryConfig) -> str:
    """What a recipe is called in folders and study attributes: the family, or the
    factory's function name."""
    if isinstance(cfg, FactoryConfig):
        return cfg.factory.split(":")[1]
    return cfg.kind
