"""Task vectors, merging and the adaptive coefficient (lambda) strategies of TAKFL step 6.

    tau_ij    = theta_ij - theta_avg_j
    theta_new = theta_avg_j + sum_i lambda_i * tau_ij,   lambda on the simplex

(``scale`` multiplies the sum only in the takfl-scaled ablation.) The strategies
that choose lambda are registered in :mod:`takfl.lambdas`.

Candidate merges are scored through ``torch.func.functional_call`` on one
scratch state per student: no module is ever deep-copied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from takfl.state import State


def task_vector(theta: State, base: State) -> State:
    """theta - base for every floating-point entry (integer buffers have no task vector)."""
    return {k: theta[k] - base[k] for k, v in base.items() if v.is_floating_point()}


def merge(base: State, vectors: list[State], lambdas: torch.Tensor, scale: float = 1.0) -> State:
    """base + scale * sum_i lambdas[i] * vectors[i]; integer entries are copied from base.

    Args:
        base: theta_avg_j. vectors: m task vectors with base's float keys. lambdas: (m,).
    """
    if len(vectors) != lambdas.numel():
        raise ValueError(f"{len(vectors)} task vectors but {lambdas.numel()} coefficients")
    out: State = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = v.clone()
        for lam, vec in zip(lambdas.tolist(), vectors, strict=True):
            if lam != 0.0:
                acc.add_(vec[k].to(acc.device), alpha=scale * lam)
        out[k] = acc
    return out


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of v (m,) onto {x >= 0, sum x = 1} (sort-based algorithm)."""
    if v.ndim != 1 or v.numel() == 0:
        raise ValueError(f"expected a non-empty vector, got shape {tuple(v.shape)}")
    u, _ = torch.sort(v.to(torch.float64), descending=True)
    css = torch.cumsum(u, 0) - 1.0
    ks = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    rho = int(torch.nonzero(u - css / ks > 0).max())
    theta = css[rho] / (rho + 1)
    return torch.clamp(v.to(torch.float64) - theta, min=0.0).to(torch.float32)


def simplex_candidates(m: int, n_random: int, seed: int) -> torch.Tensor:
    """(K, m) points on the simplex: the m vertices, the centre, and Dirichlet(1) draws."""
    gen = torch.Generator().manual_seed(seed)
    gamma = -torch.log(torch.rand(n_random, m, generator=gen).clamp_min(1e-12))  # Exp(1)
    rand = gamma / gamma.sum(1, keepdim=True)
    return torch.cat([torch.eye(m), torch.full((1, m), 1.0 / m), rand])


class MergeScorer:
    """Evaluates merges of one student's task vectors through a single scratch state.

    The model is used only as a function (``functional_call``); its own
    weights are never changed. Task vectors are stacked per entry, (m, *shape).
    """

    def __init__(
        self, model: nn.Module, base: State, vectors: list[State], device: torch.device
    ) -> None:
        self.model = model.to(device).eval()
        self.base = {k: v.to(device) for k, v in base.items()}
        self.stacked = {
            k: torch.stack([vec[k] for vec in vectors]).to(device)
            for k, v in base.items()
            if v.is_floating_point()
        }
        self.m = len(vectors)
        self.param_names = {name for name, _ in model.named_parameters()}
        self._scratch = {k: v.clone() for k, v in self.base.items()}

    def merged(self, lambdas: torch.Tensor, scale: torch.Tensor | float) -> State:
        """A differentiable merged state (fresh tensors; used for learning).

        lambdas: (m,); scale: scalar, may carry a gradient. Buffers (BatchNorm running
        statistics) are merged with the same coefficients but carry no gradient.
        """
        out: State = {}
        for k, v in self.base.items():
            if k in self.stacked:
                lam, sc = lambdas.to(v.device), scale
                if k not in self.param_names:
                    lam = lam.detach()
                    sc = sc.detach() if isinstance(sc, torch.Tensor) else sc
                out[k] = v + sc * torch.tensordot(lam, self.stacked[k], dims=1)
            else:
                out[k] = v
        return out

    @torch.inference_mode()
    def _fill_scratch(self, lambdas: torch.Tensor, scale: float) -> State:
        for k, v in self.base.items():
            target = self._scratch[k]
            if k in self.stacked:
                torch.add(
                    v,
                    torch.tensordot(lambdas.to(v.device), self.stacked[k], dims=1),
                    alpha=scale,
                    out=target,
                )
        return self._scratch

    def logits(self, state: State, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        return torch.cat(
            [
                functional_call(self.model, state, (x[i : i + batch_size],))
                for i in range(0, len(x), batch_size)
            ]
        )

    @torch.inference_mode()
    def score(
        self, lambdas: torch.Tensor, scale: float, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[float, float]:
        """(accuracy in [0, 1], mean cross-entropy) of the merge on labelled (x, y)."""
        out = self.logits(self._fill_scratch(lambdas, scale), x)
        return float((out.argmax(1) == y).float().mean()), float(F.cross_entropy(out, y))


def best_on_validation(
    scorer: MergeScorer,
    candidates: list[torch.Tensor],
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    scale: float = 1.0,
) -> tuple[int, float, float]:
    """Index of the candidate lambda with the best validation accuracy (ties: the
    lower loss, then the earlier candidate), with its accuracy in [0, 1] and loss."""
    if len(val_x) == 0:
        raise ValueError("choosing coefficients on validation needs a labelled validation set")
    best, best_acc, best_loss = 0, -1.0, float("inf")
    for i, lam in enumerate(candidates):
        acc, loss = scorer.score(lam, scale, val_x, val_y)
        if (acc, -loss) > (best_acc, -best_loss):
            best, best_acc, best_loss = i, acc, loss
    return best, best_acc, best_loss


def optimise_on_simplex(
    scorer: MergeScorer,
    loss_of_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor | None,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 256,
) -> tuple[torch.Tensor, float]:
    """Minimise a loss over lambda = softmax(alpha), alpha starting at 0 (uniform).

    Returns (lambda (m,), last loss).
    """
    alpha = torch.zeros(scorer.m, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    last = float("nan")
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:batch_size].to(x.device)
        lam = torch.softmax(alpha, 0)
        out = functional_call(scorer.model, scorer.merged(lam, 1.0), (x[idx],))
        loss = loss_of_logits(out, y[idx] if y is not None else idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss.detach())
    return torch.softmax(alpha.detach(), 0), last


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) (B, K) -> scalar."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()
