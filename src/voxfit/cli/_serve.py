"""``voxfit serve``: the job API over HTTP, and the job runners that execute its jobs."""

from __future__ import annotations
