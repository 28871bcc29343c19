"""``voxfit worker`` and ``voxfit farm ...``: search workers sharing one study, the device farm."""

from __future__ import annotations
