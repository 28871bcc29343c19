"""Metrics: phone error rate, packed model size, adaptation quality."""

from voxfit.metrics._size import packed_size_bytes
from voxfit.train import edit_distance, error_counts, greedy_decode, phone_error_rate

__all__ = [
    "edit_distance",
    "error_counts",
    "greedy_decode",
    "packed_size_bytes",
    "phone_error_rate",
]
