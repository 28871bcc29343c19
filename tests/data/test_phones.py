from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import NEEDS_TTS
from voxfit.data import PhoneInventory, normalize_phone, phonemize
from voxfit.errors import DataError


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("'aU", "aU"),
        (",oU", "oU"),
        ("@2", "@"),
        ("a#", "a"),
        ("i@3", "i@"),
        ("3:", "3:"),
        ("3", "3"),
        ("n-", "n"),
        (";", ""),
        (":", ""),
        ("'", ""),
        ("t", "t"),
    ],
)
def test_normalize_phone_merges_espeak_marks(raw: str, expected: str) -> None:
    assert normalize_phone(raw) == expected


@NEEDS_TTS
def test_phonemize_gives_canonical_en_us_phones() -> None:
    assert phonemize("the quick brown fox") == [
        "D",
        "@",
        "k",
        "w",
        "I",
        "k",
        "b",
        "r",
        "aU",
        "n",
        "f",
        "0",
        "k",
        "s",
    ]


@NEEDS_TTS
def test_accent_voice_pronounces_differently_from_canonical_label() -> None:
    # Why every utterance is labelled with en-us: accents really differ from the label.
    assert phonemize("thought about it", voice="en-029") != phonemize("thought about it")


@given(st.lists(st.sampled_from(["a", "b", "@", "aU", "3:"]), min_size=1, max_size=30))
def test_inventory_encode_decode_round_trip(seq: list[str]) -> None:
    inv = PhoneInventory.from_sequences([["a", "b", "@", "aU", "3:"]])
    ids = inv.encode(seq)
    assert min(ids) >= 1  # 0 is reserved for the CTC blank
    assert inv.decode(ids) == seq
    assert inv.size == 6


def test_inventory_rejects_unknown_phone_naming_the_utterance() -> None:
    inv = PhoneInventory.from_sequences([["a"]])
    with pytest.raises(DataError, match=r"x\.wav: phone 'zz' is not in the model's inventory"):
        inv.encode(["a", "zz"], where="x.wav")
