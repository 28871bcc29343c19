"""Greedy CTC decoding of a voxfit model's output to phone symbols, in numpy only.

    python decode.py conformance/expected_log_probs.npy conformance/expected_lengths.npy

Per utterance: argmax class of every valid output frame (20 ms each), merge runs of the
same class, drop the blank, map the rest through ``phones.json`` (index -> symbol).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def load_phones(path: str | Path | None = None) -> dict[str, Any]:
    """The output inventory: ``symbols`` (index -> symbol) and ``blank_index`` (default:
    ``phones.json`` beside this file)."""
    path = Path(path) if path is not None else Path(__file__).with_name("phones.json")
    phones: dict[str, Any] = json.loads(path.read_text())
    return phones


def greedy_ctc(log_probs: np.ndarray, length: int, blank: int) -> list[int]:
    """Best-path class ids of one utterance: (frames, classes) -> ids without blanks."""
    best = np.asarray(log_probs)[: int(length)].argmax(axis=-1)
    ids: list[int] = []
    prev = -1
    for c in best.tolist():
        if c != prev and c != blank:
            ids.append(c)
        prev = c
    return ids


def decode(log_probs: np.ndarray, lengths: np.ndarray, phones: dict[str, Any]) -> list[list[str]]:
    """Phone symbols of each utterance of a (batch, frames, classes) output."""
    symbols, blank = phones["symbols"], int(phones["blank_index"])
    return [
        [symbols[i] for i in greedy_ctc(lp, n, blank)]
        for lp, n in zip(log_probs, lengths, strict=True)
    ]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python decode.py log_probs.npy [lengths.npy]", file=sys.stderr)
        return 2
    lp = np.load(argv[1])
    lengths = np.load(argv[2]) if len(argv) == 3 else np.full(lp.shape[0], lp.shape[1])
    for utt in decode(lp, lengths, load_phones()):
        print(" ".join(utt))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
