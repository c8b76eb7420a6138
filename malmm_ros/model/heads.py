"""Verb, noun and action classifiers on the last step's Q-Former query outputs."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ['AnticipationHeads', 'HeadLogits']


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
