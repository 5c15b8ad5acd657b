"""Token embedding built without initial values: every model loads its weight right after."""

from __future__ import annotations

import torch
from torch import nn


def token_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """nn.Embedding with an empty weight. Its default init (normal_) on the meta device, where
    models are built, makes torch import its meta decompositions: a second of start-up per process."""
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))
