"""Work folders for real services: the session's tiny corpus linked in, and one shared
``models/`` folder, so the tiny base model is trained once for every served job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from voxfit.data import Manifest


@pytest.fixture(scope="session")
def served_work(
    tiny_manifest: Manifest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """``make(name)``: a fresh ``<tmp>/<name>/work`` with ``corpus/tiny-<hash>`` and
    ``models`` linked to the session's (make_corpus and train_cached find them done)."""
    models = tmp_path_factory.mktemp("served-models")
    corpus = tiny_manifest.source.parent

    def make(name: str) -> Path:
        work = tmp_path_factory.mktemp(name) / "work"
        (work / "corpus").mkdir(parents=True)
        (work / "corpus" / corpus.name).symlink_to(corpus)
        (work / "models").symlink_to(models)
        return work

    return make
