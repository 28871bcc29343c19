"""Search spaces (``spaces/*.yaml``): loading, validation against a model, sampling."""

from voxfit.spaces._space import (
    SPACE_SCHEMA_VERSION,
    BoundSpace,
    Rule,
    SearchSpace,
    Suggester,
    find_space,
    load_space,
    params_of,
    sample,
    space_from_dict,
)

__all__ = [
    "SPACE_SCHEMA_VERSION",
    "BoundSpace",
    "Rule",
    "SearchSpace",
    "Suggester",
    "find_space",
    "load_space",
    "params_of",
    "sample",
    "space_from_dict",
]
