from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from voxfit.metrics import edit_distance, greedy_decode

seqs = st.lists(st.integers(1, 5), max_size=12)


def test_edit_distance_known_cases() -> None:
    assert edit_distance([], []) == 0
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1  # deletion
    assert edit_distance([1, 2, 3], [1, 4, 3]) == 1  # substitution
    assert edit_distance([1, 2], [3, 1, 2, 4]) == 2  # insertions
    assert edit_distance("kitten", "sitting") == 3


@given(seqs, seqs)
def test_edit_distance_is_a_bounded_symmetric_metric(a: list[int], b: list[int]) -> None:
    d = edit_distance(a, b)
    assert d == edit_distance(b, a)
    assert abs(len(a) - len(b)) <= d <= max(len(a), len(b))
    assert (d == 0) == (a == b)


@given(seqs, seqs, seqs)
def test_edit_distance_triangle_inequality(a: list[int], b: list[int], c: list[int]) -> None:
    assert edit_distance(a, c) <= edit_distance(a, b) + edit_distance(b, c)


def test_greedy_decode_merges_repeats_drops_blanks_and_respects_lengths() -> None:
    path = [0, 3, 3, 0, 3, 1, 1, 0, 2, 2]
    lp = torch.full((1, len(path), 4), -10.0)
    lp[0, torch.arange(len(path)), torch.tensor(path)] = 0.0
    assert greedy_decode(lp, torch.tensor([len(path)])) == [[3, 3, 1, 2]]
    assert greedy_decode(lp, torch.tensor([5])) == [[3, 3]]
