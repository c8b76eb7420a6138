"""Tests of the anticipation heads."""

from __future__ import annotations

import pytest
import torch

from malmm_ros.model.heads import AnticipationHeads, HeadLogits


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
