"""Nucleus (top-p) sampling ranks the top few hundred tokens first and sorts the whole
vocabulary only when the nucleus is larger: either way it draws only from the nucleus,
and from all of it."""
from __future__ import annotations

import torch

from engine.llm.base import GenParams
from engine.llm.decoding import NUCLEUS_FIRST, Sampler


def nucleus(logits, t: float, p: float) -> list[int]:
    """The reference: the whole vocabulary sorted, tokens kept until their mass reaches p."""
    probs = torch.softmax(logits[0] / t, -1)
    ranked, order = probs.sort(descending=True)
    return order[(ranked.cumsum(0) - ranked) < p].tolist()


def draws(logits, t: float, p: float, n: int = 400) -> list[int]:
    sampler = Sampler(GenParams(temperature=t, top_p=p, seed=5), "cpu", prompt=[1, 2, 3])
    return [sampler(logits) for _ in range(n)]


def test_a_peaked_distribution_draws_from_its_nucleus_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 151936) * 4
    want = set(nucleus(logits, 0.7, 0.8))
    got = draws(logits, 0.7, 0.8)
    assert 1 < len(want) < NUCLEUS_FIRST and set(got) <= want and len(set(got)) > 1


def test_a_flat_distribution_reaches_past_the_first_candidates():
    torch.manual_seed(1)
    logits = torch.randn(1, 5000) * 0.1
    ranked = nucleus(logits, 1.0, 0.9)
    got = draws(logits, 1.0, 0.9)
    assert len(ranked) > 4 * NUCLEUS_FIRST and set(got) <= set(ranked)
    rank = {tok: i for i, tok in enumerate(ranked)}
    assert sum(rank[g] >= NUCLEUS_FIRST for g in got) > len(got) / 2  # (most of the mass lies past them)


def test_greedy_and_suppressed_tokens():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert Sampler(GenParams(temperature=0.0), "cpu")(logits) == 1
    assert Sampler(GenParams(temperature=0.0), "cpu", suppress=[1])(logits) == 3
    even = torch.tensor([[0.0, 0.3, 0.1, 0.2]])
    assert set(draws(even, 1.0, 1.0, 200)) == {0, 1, 2, 3}  # top_p 1: the whole vocabulary
