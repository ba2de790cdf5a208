"""A snapshot ensemble as one network: the model that is evaluated is the model that is deployed.

Hall et al. (2020, §3) average the outputs of snapshot models saved during one training
run. Training scores the test split with that average, so everything downstream
(predict, serve, audit, ONNX export) must run the same average, not one checkpoint.
`SnapshotEnsemble` is a `CXRClassifier` whose members run side by side:

* stage ``k`` of the ensemble runs stage ``k`` of every member; the members' feature maps
  are concatenated along the channel axis, ``(B, M * C_k, h, w)`` (stage 0 gives every
  member the same input image, later stages give member ``m`` its own channel block);
* the head splits the last feature map back into the members' blocks, runs each member's
  head and returns the logit of the *averaged probability* (`average_logits`), so
  ``sigmoid`` / ``softmax`` of the ensemble's logit is exactly the mean of the members'
  probabilities, as training averaged them.

So Grad-CAM on ``stages.k`` explains the ensemble's own output (the gradient of the
averaged prediction with respect to every member's activations), ``embed`` is the
concatenation of the members' embeddings, and the ONNX exporter sees one graph.

Example:
    >>> from covidcxr.models import create_model
    >>> members = [create_model("conv8", width=8).eval() for _ in range(3)]
    >>> ensemble = SnapshotEnsemble(members).eval()
    >>> x = torch.zeros(2, 1, 64, 64)
    >>> mean = torch.stack([torch.sigmoid(m(x)) for m in members]).mean(0)
    >>> bool(torch.allclose(torch.sigmoid(ensemble(x)), mean, atol=1e-6))
    True
    >>> ensemble.embed(x).shape[1] == 3 * members[0].num_features
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.models.base import CXRClassifier

__all__ = ["SnapshotEnsemble", "average_logits"]


def average_logits(logits: Sequence[torch.Tensor] | torch.Tensor, binary: bool) -> torch.Tensor:
    """The logit of the members' averaged probability.

    Args:
        logits: ``M`` tensors ``(B, K)`` (or one ``(M, B, K)`` tensor) of member logits.
        binary: sigmoid outputs (``K == 1``) rather than softmax.

    Returns:
        ``(B, K)``: binary ``logit(mean_m sigmoid(l_m))``, computed as
        ``logsumexp(logsigmoid(l)) - logsumexp(logsigmoid(-l))`` (the ``log M`` terms
        cancel; no overflow at saturated members); multi-class
        ``log(mean_m softmax(l_m))``, whose softmax is that mean.
    """
    stacked = torch.stack(list(logits)) if not isinstance(logits, torch.Tensor) else logits
    stacked = stacked.float()
    if binary:
        return torch.logsumexp(nn.functional.logsigmoid(stacked), dim=0) - torch.logsumexp(nn.functional.logsigmoid(-stacked), dim=0)
    return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - math.log(stacked.shape[0])


class _ParallelStage(nn.Module):
    """Stage ``k`` of every member, channel blocks side by side."""

    def __init__(self, stages: Sequence[nn.Module], shared_input: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(stages)
        self.shared_input = shared_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = [x] * len(self.members) if self.shared_input else torch.chunk(x, len(self.members), dim=1)
        return torch.cat([stage(part) for stage, part in zip(self.members, inputs)], dim=1)


class _ParallelHead(nn.Module):
    """Each member's head on its channel block; the logit of the averaged probability."""

    def __init__(self, heads: Sequence[nn.Module], binary: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(heads)
        self.binary = binary

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(features, len(self.members), dim=1)
        return average_logits([head(part) for head, part in zip(self.members, parts)], self.binary)


class SnapshotEnsemble(CXRClassifier):
    """Members of one architecture run as one network whose output is their averaged probability.

    Args:
        members: ``M >= 1`` trained networks of the same architecture and head (the
            snapshot checkpoints of one run, `covidcxr.train.inference.load_run`).

    Raises:
        CovidCXRError: no member, or members that differ in classes, channels or stages.
    """

    def __init__(self, members: Sequence[CXRClassifier]) -> None:
        members = list(members)
        if not members:
            raise CovidCXRError("a snapshot ensemble needs at least one member")
        first = members[0]
        for member in members[1:]:
            if (member.num_classes, member.in_channels, len(member.stages), member.num_features) != (
                first.num_classes, first.in_channels, len(first.stages), first.num_features
            ):
                raise CovidCXRError("snapshot ensemble members must share architecture, classes and input channels")
        super().__init__(num_classes=first.num_classes, in_channels=first.in_channels)
        self.num_members = len(members)
        self.num_features = first.num_features * len(members)
        self.stages = nn.ModuleList(
            _ParallelStage([m.stages[k] for m in members], shared_input=(k == 0)) for k in range(len(first.stages))
        )
        self.head = _ParallelHead([m.head for m in members], binary=first.num_classes == 1)
        self.default_cfg = {**first.default_cfg, "ensemble_members": len(members), "num_features": self.num_features}
