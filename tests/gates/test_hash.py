"""Tests of src/gatedmoe/gates/hash.py."""

import pytest
import torch

from gatedmoe.gates import HashGate
from gatedmoe.gates.hash import hash_token_ids


def test_multiplicative_hash_by_hand():
    # 2654435761 * v mod 2^32 mod 4 for v = 0, 1, 2: 0, 2654435761 % 4 = 1, (5308871522 - 2^32) % 4 = 2.
    assert hash_token_ids(torch.tensor([0, 1, 2]), 4).tolist() == [0, 1, 2]
    g = HashGate(3, 4)
    r = g(torch.randn(3, 3), token_ids=torch.tensor([2, 1, 1])).validate()
    assert r.combine_matrix().tolist() == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0]]


def test_random_hash_table_is_balanced_and_fixed():
    g = HashGate(3, 4, vocab_size=10, seed=1)
    assert torch.bincount(g.table, minlength=4).tolist() in ([3, 3, 2, 2], [3, 2, 3, 2], [2, 3, 3, 2], [3, 2, 2, 3], [2, 3, 2, 3], [2, 2, 3, 3])
    assert torch.equal(HashGate(3, 4, vocab_size=10, seed=1).table, g.table)
    ids = torch.arange(10)
    r = g(torch.randn(10, 3), token_ids=ids)
    assert torch.equal(r.combine_matrix().argmax(-1), g.table)
    # Same id, same expert, whatever the input.
    a = g(torch.randn(1, 3), token_ids=torch.tensor([7])).expert
    b = g(torch.randn(1, 3), token_ids=torch.tensor([7])).expert
    assert torch.equal(a, b)


def test_bad_token_ids():
    g = HashGate(3, 4, vocab_size=10)
    with pytest.raises(ValueError, match="token_ids"):
        g(torch.randn(2, 3))
    with pytest.raises(ValueError, match="token_ids"):
        g(torch.randn(2, 3), token_ids=torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="token_ids"):
        g(torch.randn(2, 3), token_ids=torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="token_ids"):
        g(torch.randn(2, 3), token_ids=torch.tensor([1]))
    with pytest.raises(TypeError, match="token_ids"):
        g(torch.randn(2, 3), token_ids=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="vocab_size"):
        HashGate(3, 4, vocab_size=0)
