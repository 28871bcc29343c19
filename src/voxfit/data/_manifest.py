"""The corpus manifest: one JSON object per line describing one utterance.

A line looks like::

    {"path": "wavs/spk03/0007.wav", "speaker": "spk03", "split": "train",
     "phones": "D @ k w I k", "text": "the quick", "duration_s": 1.42}

``path`` is relative to the manifest's folder (or absolute). Splits: ``train`` and ``dev``
belong to training speakers; ``adapt`` and ``eval`` to held-out "new user" speakers.
Users bring their own corpus as a file of the same shape.
"""

from __future__ import annotations

import json
import os
import wave
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from voxfit._config import (
    MAX_MANIFEST_BYTES,
    UTTERANCE_S,
    check_float,
    key_text,
    read_user_text,
    show,
)
from voxfit.errors import DataError

SPLITS = ("train", "dev", "adapt", "eval")
TRAIN_SPLITS = frozenset({"train", "dev"})
HELDOUT_SPLITS = frozenset({"adapt", "eval"})
_KEYS = ("path", "speaker", "split", "phones", "text", "duration_s")


@dataclass(frozen=True, slots=True)
class Utterance:
    """One manifest row. ``path`` is absolute once loaded; ``phones`` is a tuple of symbols."""

    path: str
    speaker: str
    split: str
    phones: tuple[str, ...]
    text: str
    duration_s: float


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated corpus description."""

    source: Path
    utterances: tuple[Utterance, ...]

    def split(self, name: str) -> list[Utterance]:
        """Utterances of one split, in manifest order."""
        return [u for u in self.utterances if u.split == name]

    def speakers(self, split: str) -> list[str]:
        """Speakers that have utterances in ``split``, sorted."""
        return sorted({u.speaker for u in self.utterances if u.split == split})

    def by_speaker(self, split: str) -> dict[str, list[Utterance]]:
        """Utterances of ``split`` grouped by speaker (sorted by speaker)."""
        groups: dict[str, list[Utterance]] = defaultdict(list)
        for u in self.utterances:
            if u.split == split:
                groups[u.speaker].append(u)
        return dict(sorted(groups.items()))


def _fail(path: Path, lineno: int, msg: str) -> DataError:
    return DataError(f"{path}:{lineno}: {msg}")


def _parse_line(path: Path, lineno: int, line: str, check_audio: bool) -> Utterance:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _fail(path, lineno, f"not valid JSON ({e.msg} at column {e.colno})") from None
    except (RecursionError, ValueError) as e:  # nesting too deep; an int of 5000 digits
        raise _fail(path, lineno, f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise _fail(path, lineno, "expected a JSON object")
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise _fail(path, lineno, f"missing key(s) {', '.join(missing)}")
    unknown = sorted(set(obj) - set(_KEYS))
    if unknown:
        raise _fail(path, lineno, f"unknown key(s) {', '.join(map(key_text, unknown))}")
    split = obj["split"]
    if not isinstance(split, str) or split not in SPLITS:
        raise _fail(
            path, lineno, f"unknown split {show(split)} (expected one of {', '.join(SPLITS)})"
        )
    phones = obj["phones"]
    if not isinstance(phones, str) or not phones.split():
        raise _fail(path, lineno, "'phones' must be a non-empty space-separated string")
    if not isinstance(obj["speaker"], str) or not obj["speaker"]:
        raise _fail(path, lineno, "'speaker' must be a non-empty string")
    if not isinstance(obj["text"], str):
        raise _fail(path, lineno, f"'text' must be a string, got {show(obj['text'])}")
    raw_duration = obj["duration_s"]
    try:
        duration = float(raw_duration)
    except (TypeError, ValueError, OverflowError):
        raise _fail(path, lineno, f"'duration_s' is not a number: {show(raw_duration)}") from None
    if isinstance(raw_duration, bool):
        raise _fail(path, lineno, f"'duration_s' is not a number: {raw_duration!r}")
    problem = check_float(duration, UTTERANCE_S)
    if problem:
        raise _fail(path, lineno, f"'duration_s' {problem}")
    if not isinstance(obj["path"], str) or not obj["path"] or "\0" in obj["path"]:
        raise _fail(path, lineno, f"'path' must be a file name, got {show(obj['path'])}")
    wav = Path(obj["path"])
    if not wav.is_absolute():
        wav = path.parent / wav
    if check_audio and not wav.is_file():
        raise _fail(path, lineno, f"audio file not found: {wav}")
    return Utterance(
        path=str(wav),
        speaker=obj["speaker"],
        split=split,
        phones=tuple(phones.split()),
        text=str(obj["text"]),
        duration_s=duration,
    )


def load_manifest(path: str | os.PathLike[str], check_audio: bool = True) -> Manifest:
    """Read and validate a manifest file.

    Args:
        path: the JSONL manifest.
        check_audio: also check that every wav file exists.

    Raises:
        DataError: naming the file and line: an empty, binary or non-UTF-8 file, bad JSON
            (a line cut off mid-way), a missing/unknown key, an unknown split, a duration
            that is not a finite number of seconds in (0, 3600], a missing wav, a speaker in
            both training and held-out splits, or no training data.
    """
    src = Path(path)
    if not src.exists():
        raise DataError(f"{src}: manifest not found")
    # empty, binary and non-UTF-8 files fail here, naming the file (and the line)
    _, text = read_user_text(src, max_bytes=MAX_MANIFEST_BYTES, error=DataError)
    utts: list[Utterance] = []
    first_line: dict[str, tuple[int, str]] = {}
    # split on "\n" only: JSON strings may hold U+2028 and friends, which splitlines() splits
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        u = _parse_line(src, lineno, line, check_audio)
        role = "training" if u.split in TRAIN_SPLITS else "held-out"
        seen = first_line.setdefault(u.speaker, (lineno, role))
        if seen[1] != role:
            raise _fail(
                src,
                lineno,
                f"speaker {show(u.speaker)} is {role} here but {seen[1]} on line {seen[0]}",
            )
        utts.append(u)
    if not any(u.split == "train" for u in utts):
        raise DataError(f"{src}: no utterance has split 'train'")
    return Manifest(source=src, utterances=tuple(utts))


def write_manifest(path: str | os.PathLike[str], utterances: Iterable[Utterance]) -> None:
    """Write utterances as JSONL, paths relative to the manifest's folder (atomic replace)."""
    dst = Path(path)
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for u in utterances:
            row = asdict(u)
            row["phones"] = " ".join(u.phones)
            p = Path(u.path).resolve()
            if p.is_relative_to(dst.parent.resolve()):
                row["path"] = str(p.relative_to(dst.parent.resolve()))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, dst)


def read_wav(path: str) -> tuple[bytes, int]:
    """Raw 16-bit PCM bytes and sample rate of a mono wav.

    Raises:
        DataError: not a mono 16-bit PCM wav.
    """
    try:
        with wave.open(path, "rb") as w:
            if w.getnchannels() != 1 or w.getsampwidth() != 2:
                raise DataError(
                    f"{path}: need mono 16-bit PCM wav, got {w.getnchannels()} channel(s) "
                    f"x {8 * w.getsampwidth()} bit (convert with `sox in.wav -c 1 -b 16 out.wav`)"
                )
            return w.readframes(w.getnframes()), w.getframerate()
    except (wave.Error, EOFError) as e:
        raise DataError(f"{path}: unreadable wav ({e})") from None
