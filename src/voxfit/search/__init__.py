"""The search service: Optuna study over a space for one profile, bundles, review."""

from voxfit.search._bundle import export_bundle, verify_bundle, write_manifest
from voxfit.search._context import SearchContext
from voxfit.search._report import (
    front_table,
    importance_figure,
    latency_figure,
    load_study,
    pareto_3d_figure,
    pareto_figure,
    plan_heatmap,
    speaker_figure,
    study_frame,
    write_report,
)
from voxfit.search._study import (
    DEFAULT_SAMPLER,
    OBJECTIVES,
    SAMPLERS,
    SearchSettings,
    baselines,
    constraints_of,
    is_feasible,
    make_sampler,
    open_storage,
    prepare_study,
    run_search,
)

__all__ = [
    "DEFAULT_SAMPLER",
    "OBJECTIVES",
    "SAMPLERS",
    "SearchContext",
    "SearchSettings",
    "baselines",
    "constraints_of",
    "is_feasible",
    "export_bundle",
    "front_table",
    "importance_figure",
    "latency_figure",
    "load_study",
    "pareto_3d_figure",
    "pareto_figure",
    "plan_heatmap",
    "speaker_figure",
    "study_frame",
    "write_report",
    "make_sampler",
    "open_storage",
    "prepare_study",
    "run_search",
    "verify_bundle",
    "write_manifest",
]
