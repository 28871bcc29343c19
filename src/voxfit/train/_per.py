"""Phone error rate for train's own modules; it lives in ``voxfit.metrics``.

Transitional: ``_loop``, ``_adapt`` and ``_pipeline`` import it from here. Once they import
``voxfit.metrics`` directly this module goes.
"""

from voxfit.metrics import edit_distance, error_counts, greedy_decode, phone_error_rate

__all__ = ["edit_distance", "error_counts", "greedy_decode", "phone_error_rate"]
