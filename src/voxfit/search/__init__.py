"""The search service: Optuna study over a space for one profile, bundles, review.

A study is read through :func:`load_study`, :func:`records` (one :class:`TrialRecord` per
trial), :func:`front` and :func:`study_frame`; the same feasibility rule and front serve the
search, ``voxfit export --pareto``, the report and the notebook.
"""

from voxfit.search._access import (
    complete,
    front,
    front_table,
    load_study,
    open_storage,
    peer_latency_ms,
    profile_of,
    records,
    spread,
    study_frame,
)
from voxfit.search._audit import AuditCheck, AuditLog, audit_path, check_head, verify_log
from voxfit.search._bundle import (
    BundleCheck,
    check_bundle,
    export_bundle,
    verify_bundle,
    write_manifest,
)
from voxfit.search._bundle_describe import ConformanceCheck
from voxfit.search._context import SearchContext
from voxfit.search._early import EarlyStop
from voxfit.search._figures import (
    LABELS,
    NOTES,
    importance_figure,
    latency_figure,
    pareto_3d_figure,
    pareto_figure,
    plan_heatmap,
    plan_matrix,
    speaker_figure,
)
from voxfit.search._record import (
    OBJECTIVES,
    AccuracyRecord,
    LatencyRecord,
    TrialRecord,
    record_of,
)
from voxfit.search._report import write_report
from voxfit.search._signing import (
    describe_signature,
    fingerprint,
    keygen,
    load_private_key,
    load_public_key,
    read_signature,
    sign_bundle,
    signature_problems,
)
from voxfit.search._study import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    SearchSettings,
    baselines,
    export_peer,
    make_sampler,
    prepare_study,
    run_search,
)
from voxfit.search._worker import (
    BudgetCount,
    WorkerReport,
    count_budget,
    logical_trials,
    record_budget,
    run_worker,
    work_until_budget,
)

__all__ = [
    "export_peer",
    "DEFAULT_SAMPLER",
    "LABELS",
    "NOTES",
    "OBJECTIVES",
    "SAMPLERS",
    "AccuracyRecord",
    "AuditCheck",
    "AuditLog",
    "BudgetCount",
    "BundleCheck",
    "ConformanceCheck",
    "EarlyStop",
    "LatencyRecord",
    "SearchContext",
    "SearchSettings",
    "TrialRecord",
    "WorkerReport",
    "audit_path",
    "baselines",
    "check_bundle",
    "check_head",
    "complete",
    "count_budget",
    "describe_signature",
    "export_bundle",
    "fingerprint",
    "front",
    "front_table",
    "spread",
    "peer_latency_ms",
    "importance_figure",
    "keygen",
    "latency_figure",
    "load_private_key",
    "load_public_key",
    "load_study",
    "logical_trials",
    "make_sampler",
    "open_storage",
    "pareto_3d_figure",
    "pareto_figure",
    "plan_heatmap",
    "plan_matrix",
    "prepare_study",
    "profile_of",
    "read_signature",
    "record_budget",
    "record_of",
    "records",
    "run_worker",
    "run_search",
    "sign_bundle",
    "signature_problems",
    "speaker_figure",
    "study_frame",
    "verify_bundle",
    "verify_log",
    "write_manifest",
    "work_until_budget",
    "write_report",
]
