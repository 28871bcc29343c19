"""Exceptions voxfit raises for problems a user can fix.

The CLI turns every :class:`VoxfitError` into one line on stderr and a non-zero exit; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "ModelError", "SynthesisError", "VoxfitError"]


class VoxfitError(Exception):
    """Base class: a problem with the user's input or environment, reported in one line."""


class ConfigError(VoxfitError):
    """A configuration value (YAML, CLI option, preset) is missing or invalid."""


class DataError(VoxfitError):
    """A corpus manifest, audio file or feature cache is broken; names the file and line."""


class SynthesisError(VoxfitError):
    """A TTS engine or sox failed or is missing while making the corpus."""


class ModelError(VoxfitError):
    """A model, its structure declaration or a checkpoint is inconsistent."""
