"""Learning across sources: a gradient-reversal source head and GroupDRO over sources.

Two ways to stop a classifier from leaning on the hospital an image came from
(recipe section ``domain:``, `covidcxr.train.recipe.DomainSection`):

* **source-adversarial training** (Ganin et al. 2016, JMLR 17:59, "Domain-adversarial
  training of neural networks"): `SourceAdversary` predicts the source from the pooled
  backbone features through `GradientReversal` — the identity forward, ``-λ`` times the
  gradient backward — so the head learns the source while the backbone unlearns it. λ
  follows `ganin_lambda` (0 at the start, ``weight`` at the end);
* **GroupDRO** (Sagawa et al. 2020, ICLR, "Distributionally robust neural networks for
  group shifts", Algorithm 1): `GroupDRO` minimises a weighted sum of the per-source
  losses whose weights move towards the worst source by exponentiated gradient.

Example:
    >>> import torch
    >>> x = torch.ones(2, 3, requires_grad=True)
    >>> grad_reverse(x, 0.5).sum().backward()
    >>> x.grad[0].tolist()
    [-0.5, -0.5, -0.5]
    >>> dro = GroupDRO(n_groups=2, eta=1.0)
    >>> _ = dro(torch.tensor([0.1, 0.1, 2.0, 2.0]), torch.tensor([0, 0, 1, 1]))
    >>> bool(dro.q[1] > dro.q[0])
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GradientReversal", "GroupDRO", "SourceAdversary", "ganin_lambda", "grad_reverse"]


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``-lambda`` backward (Ganin et al. 2016, §3.2)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lam = float(lam)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """``x`` unchanged; its gradient reversed and scaled by ``lam`` on the way back."""
    return GradientReversal.apply(x, lam)


def ganin_lambda(progress: float, weight: float = 1.0, gamma: float = 10.0, schedule: str = "ganin") -> float:
    """The reversal coefficient at training progress ``progress`` in [0, 1].

    ``ganin``: ``weight * (2 / (1 + exp(-gamma * p)) - 1)`` (Ganin et al. 2016, §5.2.2:
    suppresses the noisy source signal of the early epochs); ``constant``: ``weight``.
    """
    if schedule == "constant":
        return float(weight)
    p = min(max(float(progress), 0.0), 1.0)
    return float(weight) * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


class SourceAdversary(nn.Module):
    """Source classifier on pooled features behind a gradient reversal.

    Args:
        in_features: width of the pooled features (``CXRClassifier.num_features``).
        n_sources: number of training sources.
        hidden: width of the hidden layer (Ganin et al.'s domain classifier is an MLP).

    Shapes: ``(B, in_features)`` -> ``(B, n_sources)`` logits.
    """

    def __init__(self, in_features: int, n_sources: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_sources))

    def forward(self, features: torch.Tensor, lam: float) -> torch.Tensor:
        return self.net(grad_reverse(features.float(), lam))


class GroupDRO(nn.Module):
    """Online GroupDRO (Sagawa et al. 2020, Algorithm 1) over ``n_groups`` groups (here: sources).

    Each step: the mean loss of every group present in the batch, ``q_g <- q_g *
    exp(eta * loss_g)`` (exponentiated gradient ascent on the group weights), q
    normalised, and the returned loss is ``sum_g q_g loss_g`` (q held fixed for the
    gradient). ``q`` is a buffer, so it is saved in checkpoints and a resumed run continues
    from it.

    Args:
        n_groups: number of groups.
        eta: the step size η of the weight update.
    """

    def __init__(self, n_groups: int, eta: float = 0.01) -> None:
        super().__init__()
        self.n_groups = int(n_groups)
        self.eta = float(eta)
        self.register_buffer("q", torch.full((self.n_groups,), 1.0 / self.n_groups))

    def forward(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """``losses`` ``(B,)`` per-sample losses, ``groups`` ``(B,)`` group ids -> the robust loss (scalar)."""
        groups = groups.to(losses.device).long()
        one_hot = F.one_hot(groups, self.n_groups).to(losses.dtype)  # (B, G)
        counts = one_hot.sum(0)
        group_loss = (one_hot * losses[:, None]).sum(0) / counts.clamp(min=1)
        present = counts > 0
        if self.training:
            with torch.no_grad():
                step = torch.where(present, self.eta * group_loss.detach().float(), torch.zeros_like(self.q))
                q = self.q * torch.exp(step)
                self.q.copy_(q / q.sum())
        q = self.q.to(losses.dtype) * present.to(losses.dtype)
        return (q * group_loss).sum() / q.sum().clamp(min=1e-12)
