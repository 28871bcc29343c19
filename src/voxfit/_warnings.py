"""Known noise of the exporters voxfit drives, kept out of users' output.

Each filter names the category and the message (and the module where the warning is
attributed to the library), so any other warning, a new one included, still shows. Checked
with torch 2.13, onnxruntime 1.32 and TVM 0.27: re-check them when a pin moves.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (category, message regex, module regex or "" for any). Both regexes match at the start.
_EXPORT_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # torch.export's run_decompositions deep-copies pytree specs (TVM's importer decomposes
    # the program); torch's own TreeSpec code warns about itself, attributed to copyreg.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", ""),
    # We choose the TorchScript ONNX exporter on purpose (dynamo=False): its graph names
    # the module scopes that select the int8 nodes. Attributed to the caller (voxfit).
    (DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export", r"voxfit\."),
    (DeprecationWarning, r"The feature will be removed", r"torch\.onnx\."),
)


class _DropOrtPreprocessHint(logging.Filter):
    """onnxruntime's quantizer logs "Please consider (to run) pre-processing ..." on the root
    logger at every call; the shape inference it suggests does not change our QDQ graph."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            "onnxruntime" in record.pathname
            and str(record.msg).startswith("Please consider")
            and "pre-processing" in str(record.msg)
        )


@contextmanager
def quiet_export() -> Iterator[None]:
    """Within the block, the known torch.export / ONNX export warnings are not shown.

    For the calls that export or import a graph: ``torch.onnx.export``, onnxruntime's
    ``quantize_static``, ``torch.export.export`` and TVM's ``from_exported_program``. The
    previous warning filters and root-logger filters are restored on exit.
    """
    drop = _DropOrtPreprocessHint()
    root = logging.getLogger()
    with warnings.catch_warnings():
        for category, message, module in _EXPORT_WARNINGS:
            warnings.filterwarnings("ignore", message, category, module)
        root.addFilter(drop)
        try:
            yield
        finally:
            root.removeFilter(drop)
