"""Tests of the anticipation heads and the verb x noun action top-k."""

from __future__ import annotations

import itertools

import pytest
import torch

from malmm_ros.model.heads import AnticipationHeads, HeadLogits, verb_noun_action_topk


def _brute_force_topk(verb_probs: torch.Tensor, noun_probs: torch.Tensor, k: int
                      ) -> list[list[tuple[float, int, int]]]:
    """Every (verb, noun) pair of every batch row, scored and sorted, k best kept."""
    out = []
    for v_row, n_row in zip(verb_probs.tolist(), noun_probs.tolist(), strict=True):
        pairs = [(v_row[v] * n_row[n], v, n)
                 for v, n in itertools.product(range(len(v_row)), range(len(n_row)))]
        pairs.sort(key=lambda item: -item[0])
        out.append(pairs[:k])
    return out


@pytest.mark.parametrize(
    ('num_verbs', 'num_nouns', 'k'),
    [(97, 300, 5), (10, 20, 1), (3, 50, 5), (50, 2, 5), (4, 3, 20), (1, 1, 5), (30, 30, 12)],
)
def test_topk_equals_brute_force(num_verbs: int, num_nouns: int, k: int) -> None:
    gen = torch.Generator().manual_seed(num_verbs * 1000 + num_nouns + k)
    verb_probs = torch.rand(3, num_verbs, generator=gen, dtype=torch.float64).softmax(-1)
    noun_probs = torch.rand(3, num_nouns, generator=gen, dtype=torch.float64).softmax(-1)
    scores, verb_ids, noun_ids = verb_noun_action_topk(verb_probs, noun_probs, k)
    expected = _brute_force_topk(verb_probs, noun_probs, k)
    width = min(k, num_verbs * num_nouns)
    assert scores.shape == verb_ids.shape == noun_ids.shape == (3, width)
    for row in range(3):
        assert [(v, n) for _, v, n in expected[row]] == list(
            zip(verb_ids[row].tolist(), noun_ids[row].tolist(), strict=True))
        torch.testing.assert_close(scores[row], torch.tensor([s for s, _, _ in expected[row]],
                                                             dtype=torch.float64))
        # the returned scores are the products of the returned ids' probabilities
        torch.testing.assert_close(
            scores[row], verb_probs[row, verb_ids[row]] * noun_probs[row, noun_ids[row]])


def test_topk_with_peaked_distributions() -> None:
    verb_probs = torch.tensor([[0.05, 0.9, 0.05]])
    noun_probs = torch.tensor([[0.1, 0.2, 0.7]])
    scores, verb_ids, noun_ids = verb_noun_action_topk(verb_probs, noun_probs, 2)
    assert verb_ids.tolist() == [[1, 1]] and noun_ids.tolist() == [[2, 1]]
    torch.testing.assert_close(scores, torch.tensor([[0.63, 0.18]]))


@pytest.mark.parametrize('num_actions', [0, 1, 37])
@pytest.mark.parametrize('batch', [1, 4])
def test_heads_shapes(num_actions: int, batch: int) -> None:
    torch.manual_seed(0)
    heads = AnticipationHeads(hidden_size=16, num_verbs=7, num_nouns=11, num_actions=num_actions)
    logits = heads(torch.randn(batch, 5, 16))
    assert isinstance(logits, HeadLogits)
    assert logits.verb.shape == (batch, 7)
    assert logits.noun.shape == (batch, 11)
    if num_actions:
        assert logits.action is not None and logits.action.shape == (batch, num_actions)
    else:
        assert logits.action is None and heads.action is None
        assert not any(name.startswith('action') for name in heads.state_dict())


def test_heads_pool_over_queries() -> None:
    """The heads see the mean of the queries: permuting queries changes nothing."""
    torch.manual_seed(1)
    heads = AnticipationHeads(hidden_size=8, num_verbs=3, num_nouns=4, num_actions=2)
    queries = torch.randn(2, 6, 8)
    a = heads(queries)
    b = heads(queries[:, torch.randperm(6)])
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)
    pooled = torch.nn.functional.layer_norm(queries.mean(1), (8,), heads.norm.weight,
                                            heads.norm.bias, heads.norm.eps)
    torch.testing.assert_close(a.verb, pooled @ heads.verb.weight.T + heads.verb.bias)
