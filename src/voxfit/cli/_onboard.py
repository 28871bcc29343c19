"""``voxfit device onboard``: a new target device from nothing (tuning on the device, a few
measurements, a transferred latency model, validated)."""

from __future__ import annotations
