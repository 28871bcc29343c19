"""What a job asks for: :class:`JobSpec`, checked by the project's own strict loaders.

A submission names its hardware profile and search space either by a shipped name
(``x86-avx2-2core``, ``tdnn-default``) or as YAML text. YAML text goes through the same
loaders as a file given to the command line (:func:`voxfit._config.parse_yaml`,
``profile_from_dict``, ``space_from_dict``): unknown keys, wrong types and out-of-range
values fail with one line naming the key. The job keeps the *text* it was submitted with (a
shipped file read at submission), so a later edit of a shipped file does not change a queued
job, and the runner re-reads that text through the same loaders.

Two profile settings are refused over the API: ``cross_compiler`` (a command the server
would run) and ``tuning.database_dir`` (a folder of the server's to read). A profile that
needs them is installed on the server by its operator and named instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from voxfit._config import MAX_CONFIG_BYTES, OPEN_ENDED_TRIALS, TIMEOUT_S, parse_yaml
from voxfit.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from voxfit.hw_profiles import HardwareProfile
    from voxfit.spaces import SearchSpace
    from voxfit.structure import ModelStructure

SPEC_VERSION = 1
PRESETS = ("tiny", "default")
SAMPLERS = ("tpe", "nsga2", "random")  # voxfit.search.SAMPLERS (not imported: torch)
MAX_TRIALS = OPEN_ENDED_TRIALS
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job's inputs, as stored: the profile and space as YAML text, the budget.

    ``trials``: finished trials the study should have (None = no trial limit);
    ``timeout_s``: wall-clock limit of the search (None = none); at least one is set.
    """

    profile_yaml: str
    space_yaml: str
    trials: int | None
    timeout_s: float | None
    preset: str = "default"
    sampler: str = "tpe"
    seed: int = 0
    profile_origin: str = "uploaded"  # "shipped" when named
    space_origin: str = "uploaded"
    version: int = SPEC_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        raw = json.loads(text)
        if raw.get("version") != SPEC_VERSION:
            raise ConfigError(f"job spec version {raw.get('version')} (this voxfit reads 1)")
        return cls(**raw)

    def profile(self) -> HardwareProfile:
        """The profile, through the strict loader (raises ConfigError naming the key)."""
        return parse_profile(self.profile_yaml, self.profile_origin == "shipped")

    def space(self) -> SearchSpace:
        """The space, through the strict loader (raises ConfigError naming the key)."""
        return parse_space(self.space_yaml)


def _mapping(text: str, what: str) -> dict[str, Any]:
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what}: larger than {MAX_CONFIG_BYTES // 1024} KiB")
    if not text.strip():
        raise ConfigError(f"{what}: empty")
    if "\0" in text:
        raise ConfigError(f"{what}: a NUL character; YAML text expected")
    raw = parse_yaml(text, what)
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def parse_profile(text: str, trusted: bool = False) -> HardwareProfile:
    """A profile from YAML text; ``trusted`` (shipped) profiles may name server paths.

    Raises:
        ConfigError: ``profile: <key>: <problem>`` (the loader's message).
    """
    from voxfit.hw_profiles import profile_from_dict

    profile = profile_from_dict(_mapping(text, "profile"), "profile")
    if not trusted:
        if profile.cross_compiler is not None:
            raise ConfigError(
                "profile: cross_compiler: not accepted over the API (a command the server "
                "would run); ask the operator to install the profile and name it"
            )
        if profile.tuning.database_dir is not None:
            raise ConfigError(
                "profile: tuning.database_dir: not accepted over the API (a folder on the "
                "server); leave it out (the service keeps its own tuning records)"
            )
    return profile


def parse_space(text: str) -> SearchSpace:
    """A space from YAML text (raises ConfigError: ``space: <key>: <problem>``)."""
    from voxfit.spaces import space_from_dict

    return space_from_dict(_mapping(text, "space"), "space")


def _shipped_text(name: str, what: str) -> str:
    """The text of shipped profile or space ``name`` (a plain name, never a path)."""
    # the shipped folders themselves: find_profile/find_space also take paths relative to
    # the server's working folder, which a request must not reach
    from voxfit.hw_profiles._profile import SHIPPED_PROFILES
    from voxfit.spaces._space import SHIPPED_SPACES

    folder = SHIPPED_PROFILES if what == "profile" else SHIPPED_SPACES
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    if not _NAME.fullmatch(name) or name not in names:
        raise ConfigError(f"{what}: no shipped {what} {name!r} (have: {', '.join(names)})")
    return (folder / f"{name}.yaml").read_text()


def shipped_names() -> dict[str, list[str]]:
    """The names a submission may use for ``profile`` and ``space``."""
    from voxfit.hw_profiles._profile import SHIPPED_PROFILES
    from voxfit.spaces._space import SHIPPED_SPACES

    return {
        "profiles": sorted(p.stem for p in SHIPPED_PROFILES.glob("*.yaml")),
        "spaces": sorted(p.stem for p in SHIPPED_SPACES.glob("*.yaml")),
    }


@lru_cache(maxsize=4)
def _structure(model: str, preset: str) -> ModelStructure:
    """The declaration of the space's model: a family or a factory the server can import
    (installed where the service runs, or a module in its working folder).

    Raises:
        ConfigError: ``space: model: ...``: the factory cannot be imported or called, or what
            it returns is not a structured model.
    """
    from voxfit.models import build_named

    try:
        return build_named(model, 2, preset).structure()  # type: ignore[operator,no-any-return]
    except (ConfigError, ModelError) as e:
        raise ConfigError(f"space: model: {e}") from None


def make_spec(
    *,
    profile: str | None = None,
    profile_yaml: str | None = None,
    space: str | None = None,
    space_yaml: str | None = None,
    trials: int | None = None,
    timeout_s: float | None = None,
    preset: str = "default",
    sampler: str = "tpe",
    seed: int = 0,
) -> JobSpec:
    """Check a submission and make its :class:`JobSpec`.

    The space is also bound to the model's declared names (as ``voxfit search`` does before
    any corpus or training work), so a pattern that matches no layer fails here.

    Raises:
        ConfigError: one line naming the field (``profile: latency_budget_ms: ...``,
            ``budget: ...``).
    """
    if (profile is None) == (profile_yaml is None):
        raise ConfigError("profile: give exactly one of profile (a shipped name) or profile_yaml")
    if space is not None and space_yaml is not None:
        raise ConfigError("space: give one of space (a shipped name) or space_yaml")
    if trials is None and timeout_s is None:
        raise ConfigError("budget: give trials, timeout_s or both")
    if trials is not None and not 1 <= trials <= MAX_TRIALS:
        raise ConfigError(f"trials: must be in 1..{MAX_TRIALS}, got {trials}")
    if timeout_s is not None:
        problem = TIMEOUT_S.problem(timeout_s)
        if problem:
            raise ConfigError(f"timeout_s: {problem}")
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    shipped_profile = profile is not None
    ptext = _shipped_text(profile, "profile") if profile is not None else str(profile_yaml)
    stext = (
        space_yaml if space_yaml is not None else _shipped_text(space or "tdnn-default", "space")
    )
    spec = JobSpec(
        profile_yaml=ptext,
        space_yaml=stext,
        trials=trials,
        timeout_s=timeout_s,
        preset=preset,
        sampler=sampler,
        seed=seed,
        profile_origin="shipped" if shipped_profile else "uploaded",
        space_origin="uploaded" if space_yaml is not None else "shipped",
    )
    spec.profile()
    sp = spec.space()
    sp.bind(_structure(sp.model, preset))
    return spec
