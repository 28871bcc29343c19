"""Metrics: phone error rate (greedy CTC decoding) and packed model size.

What training, compression and the search measure a model by; this package sits below
``voxfit.train`` and ``voxfit.compress`` (STYLE.md, Layout), which import it.
"""

from voxfit.metrics._per import edit_distance, error_counts, greedy_decode, phone_error_rate
from voxfit.metrics._size import packed_size_bytes

__all__ = [
    "edit_distance",
    "error_counts",
    "greedy_decode",
    "packed_size_bytes",
    "phone_error_rate",
]
