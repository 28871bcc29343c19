"""``voxfit device qemu-server``: an aarch64 TVM RPC server under qemu-user, a device this
machine can host."""

from __future__ import annotations
