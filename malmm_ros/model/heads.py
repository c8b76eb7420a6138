"""Verb, noun and action classifiers on the last step's Q-Former query outputs."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ['AnticipationHeads', 'HeadLogits', 'verb_noun_action_topk']


class HeadLogits(NamedTuple):
    """Unnormalised scores; `action` is None when the model scores actions as verb x noun."""

    verb: torch.Tensor  # (B, num_verbs)
    noun: torch.Tensor  # (B, num_nouns)
    action: torch.Tensor | None  # (B, num_actions)


class AnticipationHeads(nn.Module):
    """Mean-pool the queries, normalise, then one linear classifier per label kind.

    An action head exists only when the label maps carry an action vocabulary (a trained
    checkpoint built from the training annotations); otherwise actions are scored as
    p(verb) * p(noun), which covers every pair but ignores their correlation.
    """

    def __init__(self, hidden_size: int, num_verbs: int, num_nouns: int, num_actions: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.verb = nn.Linear(hidden_size, num_verbs)
        self.noun = nn.Linear(hidden_size, num_nouns)
        self.action = nn.Linear(hidden_size, num_actions) if num_actions else None

    def forward(self, queries: torch.Tensor) -> HeadLogits:
        """queries [B, Q, D] -> logits for verbs, nouns and (if present) actions."""
        pooled = self.norm(queries.mean(dim=1))  # (B, D)
        action = self.action(pooled) if self.action is not None else None
        return HeadLogits(self.verb(pooled), self.noun(pooled), action)


def verb_noun_action_topk(
    verb_probs: torch.Tensor, noun_probs: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (verb, noun) pairs of p(verb) * p(noun) without building more than needed.

    verb_probs [B, V], noun_probs [B, N] -> (scores [B, k], verb ids [B, k], noun ids [B, k]).
    The best k pairs only involve the top-k verbs and top-k nouns, so a k x k product suffices.
    """
    k_v, k_n = min(k, verb_probs.shape[1]), min(k, noun_probs.shape[1])
    v_scores, v_ids = verb_probs.topk(k_v, dim=1)
    n_scores, n_ids = noun_probs.topk(k_n, dim=1)
    pair = (v_scores.unsqueeze(2) * n_scores.unsqueeze(1)).flatten(1)  # (B, k_v * k_n)
    scores, flat = pair.topk(min(k, pair.shape[1]), dim=1)
    return scores, v_ids.gather(1, flat // k_n), n_ids.gather(1, flat % k_n)
