"""Canonical phoneme labels from espeak-ng and the phone inventory a model predicts."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from voxfit.errors import DataError, SynthesisError

# Bump when the mapping below changes: it is part of the corpus settings hash.
LABELS_VERSION = 2
# espeak-ng marks stress, syllabicity and palatalization with these; they are not phones.
_STRIP = re.compile(r"['`,%=;]")
# Allophone variants that espeak distinguishes by a trailing digit or '#' ("@2", "a#", "i@3").
_VARIANT = re.compile(r"^(.+?)[0-9#]+$")

BLANK = "<blank>"


def normalize_phone(raw: str) -> str:
    """Map one raw espeak-ng phoneme symbol to the merged inventory ('' if it is only a mark)."""
    sym = _STRIP.sub("", raw).strip().rstrip("-")
    if sym.strip(":") == "":  # a stray length mark
        return ""
    m = _VARIANT.match(sym)
    if m and m.group(1) not in ("", "3"):
        sym = m.group(1)
    return sym


def phonemize(text: str, voice: str = "en-us") -> list[str]:
    """Canonical phoneme sequence of ``text`` as espeak-ng's ``voice`` pronounces it.

    Every utterance is labelled with the en-us pronunciation of its text, whatever voice or
    engine spoke it: accented speakers differ from the label, which is what adaptation repairs.

    Raises:
        SynthesisError: espeak-ng is missing or fails.
    """
    try:
        out = subprocess.run(
            ["espeak-ng", "-q", "-x", "--sep=_", "-v", voice, text],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except FileNotFoundError as e:
        raise SynthesisError(
            "espeak-ng not found: install it with `apt-get install espeak-ng`"
        ) from e
    except subprocess.CalledProcessError as e:
        raise SynthesisError(f"espeak-ng -x failed for {text!r}: {e.stderr.strip()}") from e
    phones: list[str] = []
    for word in out.split():
        for raw in word.split("_"):
            p = normalize_phone(raw)
            if p:
                phones.append(p)
    return phones


@dataclass(frozen=True, slots=True)
class PhoneInventory:
    """The output symbols of an acoustic model; index 0 is the CTC blank."""

    phones: tuple[str, ...]

    @classmethod
    def from_sequences(cls, seqs: Iterable[Iterable[str]]) -> PhoneInventory:
        """Sorted set of every phone seen (deterministic for a given corpus)."""
        seen: set[str] = set()
        for s in seqs:
            seen.update(s)
        return cls(tuple(sorted(seen)))

    @property
    def size(self) -> int:
        """Number of model outputs, blank included."""
        return len(self.phones) + 1

    def encode(self, phones: Iterable[str], where: str = "") -> list[int]:
        """Phone symbols to label ids (1-based; 0 is blank).

        Raises:
            DataError: a phone is not in the inventory (``where`` names the utterance).
        """
        index = {p: i + 1 for i, p in enumerate(self.phones)}
        try:
            return [index[p] for p in phones]
        except KeyError as e:
            raise DataError(f"{where}: phone {e.args[0]!r} is not in the model's inventory") from e

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Label ids (no blanks) to phone symbols."""
        return [self.phones[i - 1] for i in ids]
