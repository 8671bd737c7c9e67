"""Many virtual clients of one prototype trained together: ``train_local`` vectorised.

A simulation trains the sampled clients of a prototype one after another with
:func:`takfl.training.train_local`. Here they train at once: every parameter and buffer is
stacked along a new leading client axis (G, ...), one forward under ``torch.vmap`` runs each
client's own weights on its own batch, one backward gives every client's gradient, and a
vectorised optimiser updates the stacks. Per client it is the same computation as
``train_local`` (equal within float rounding, not bit for bit: vmapped kernels sum in
another order):

* shuffling: a ``torch.Generator`` seeded with the client's seed, one ``randperm`` per
  epoch, consecutive ``batch_size`` slices, a one-sample batch skipped (unless the client
  owns a single sample) -- :func:`client_batches` replays it;
* loss: cross-entropy averaged over the client's real rows of the batch;
* optimiser: Adam (L2 weight decay, bias correction from the client's own step count) or
  SGD with momentum ``SGD_MOMENTUM`` and weight decay, as ``make_optimizer`` builds them.

Unequal data sizes. Clients own different numbers of samples, so at a given step some
clients run a full batch, some a partial last batch, some have finished. Padding partial
batches to a common size and masking the padded rows out of the loss would still be wrong
for BatchNorm: padded rows enter the batch mean and variance (and the running statistics).
So no row is ever padded: at each step the active clients are grouped by their batch size,
each group runs its own vmapped forward on exactly its rows (in the common case all active
clients run full batches and form one group), the groups' losses are summed and one
backward gives every client's gradient (zero for a client outside every group). A client
with no batch this step (its data exhausted) is masked: ``torch.where`` keeps its
parameters and optimiser state, and its step counter does not advance.

A time budget (``time_budget_s``) is a limit on one device's wall clock; a group shares
the clock, so each client is charged an equal share of the group's time, and the whole
group stops after the step at which that share passes the budget (``train_local`` stops
after the step at which its own time does). Unless the budget is hit, the budget changes
nothing, as in the loop. Not vectorised (callers fall back to ``train_local``): models
with dropout (their randomness comes from the global generator in ``train_local``).

Exactness: in float64 the two paths agree to about 1e-15 (resnet8, six clients); in
float32 they agree to rounding, except that Adam turns a gradient element that is
rounding noise around zero into a step of about +-lr either way, so single weights may
differ by up to a few times lr after some steps (seen on resnet8 with random data).

Speed: one grouped kernel per layer instead of G small ones pays off on an accelerator.
On a CPU the vmapped convolutions of larger models ran slower than the loop
(benchmarks/simulate_clients.py); :func:`worth_vectorising` is the automatic choice.

Memory: G copies of the weights, of the optimiser state and of the activations of one
batch per client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from takfl.config.profile import TrainingSpec
from takfl.optim import ADAM_BETAS, ADAM_EPS, SGD_MOMENTUM
from takfl.stacking import stack_copies, vmapped_forward
from takfl.state import State
from takfl.training import LocalResult


@dataclass(frozen=True)
class ClientData:
    x: torch.Tensor  # (N, C, H, W) private inputs
    y: torch.Tensor  # (N,) int64 labels
    seed: int  # the task's local-training seed


def client_batches(n: int, spec: TrainingSpec, seed: int) -> list[torch.Tensor]:
    """The row indices of every batch ``train_local`` runs on n samples, in order (CPU int64)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    for _ in range(spec.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, spec.batch_size):
            idx = order[i : i + spec.batch_size]
            if len(idx) < 2 and n >= 2:
                continue  # as train_local: BatchNorm cannot train on one sample
            out.append(idx)
    return out


def vectorisable(model: nn.Module, spec: TrainingSpec) -> str | None:
    """Why these clients must train one by one, or None when they can train together."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return "dropout draws from the global generator"
    return None


# Largest model (parameters) vectorised on a CPU by the automatic choice. On the 2-core
# development machine the digits MLP (610) and small CNN (13,754) trained 1.3-1.4x faster
# together, resnet8 (78,042) and the large digits CNN (208,586) at 0.57-0.72x the speed.
CPU_VECTORISE_MAX_PARAMETERS = 50_000


def worth_vectorising(model: nn.Module, device: torch.device | str) -> bool:
    """The automatic choice: always on an accelerator, on a CPU only for small models."""
    if torch.device(device).type != "cpu":
        return True
    return sum(p.numel() for p in model.parameters()) <= CPU_VECTORISE_MAX_PARAMETERS


def _per_client(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(G,) -> (G, 1, ..., 1) broadcastable against ``like`` (G, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


class StackedOptimizer:
    """Adam or SGD (as ``make_optimizer``) over parameters stacked on a client axis.

    ``step(grads, active)`` updates client g only where ``active[g]``: elsewhere the
    parameter, the moments and the step counter stay as they were.
    """

    def __init__(self, params: State, spec: TrainingSpec) -> None:
        self.params = params  # name -> (G, ...) leaf tensors, updated in place
        self.spec = spec
        any_p = next(iter(params.values()))
        self.steps = torch.zeros(any_p.shape[0], dtype=torch.float64, device=any_p.device)
        self.m = {n: torch.zeros_like(p) for n, p in params.items()}  # exp_avg / momentum
        self.v = (
            {n: torch.zeros_like(p) for n, p in params.items()} if spec.optimizer == "adam" else {}
        )

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor | None], active: torch.Tensor) -> None:
        """grads: name -> (G, ...) gradient (None: the parameter took no part, as torch
        skips it); active: (G,) bool."""
        spec, lr, wd = self.spec, self.spec.learning_rate, self.spec.weight_decay
        self.steps += active.to(self.steps.dtype)
        if spec.optimizer == "adam":
            b1, b2 = ADAM_BETAS
            step = self.steps.clamp(min=1.0)  # masked clients' values are discarded anyway
            step_size = lr / (1 - b1**step)  # (G,) float64, per-client bias correction
            bc2_sqrt = (1 - b2**step).sqrt()
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            mask = _per_client(active, p)
            if wd != 0:
                g = g.add(p, alpha=wd)
            m = self.m[name]
            if spec.optimizer == "adam":
                v = self.v[name]
                m_new = m.lerp(g, 1 - b1)
                v_new = v.mul(b2).addcmul_(g, g, value=1 - b2)
                denom = (v_new.sqrt() / _per_client(bc2_sqrt, p).to(p.dtype)).add_(ADAM_EPS)
                p_new = p - _per_client(step_size, p).to(p.dtype) * (m_new / denom)
                v.copy_(torch.where(mask, v_new, v))
            else:
                m_new = m.mul(SGD_MOMENTUM).add_(g)  # equals torch's clone on the first step
                p_new = p.add(m_new, alpha=-lr)
            m.copy_(torch.where(mask, m_new, m))
            p.copy_(torch.where(mask, p_new, p))


def train_clients(
    model: nn.Module,
    clients: list[ClientData],
    spec: TrainingSpec,
    *,
    device: torch.device | str = "cpu",
) -> list[LocalResult]:
    """Train G clients from ``model``'s current weights (left unchanged), all at once.

    Args:
        model: initialised with the round's global weights; its structure runs every client.
        clients: each client's (N_g, C, H, W) inputs, (N_g,) labels and shuffling seed.
        spec: as for ``train_local``; must pass :func:`vectorisable`.
    Returns:
        one :class:`LocalResult` per client, in order, as ``train_local`` would give it
        (``seconds`` is the group's wall time divided by G).
    """
    why = vectorisable(model, spec)
    if why is not None:
        raise ValueError(f"cannot train these clients together: {why}")
    if not clients:
        return []
    if any(len(c.x) == 0 for c in clients):
        raise ValueError("cannot train on an empty data set")
    start = time.monotonic()
    dev = torch.device(device)
    model.to(dev).train()
    g_all = len(clients)
    params = {n: stack_copies(p, g_all).requires_grad_(True) for n, p in model.named_parameters()}
    buffers = {n: stack_copies(b, g_all) for n, b in model.named_buffers()}
    opt = StackedOptimizer(params, spec)

    # every client's rows in one tensor; batches index it with global row numbers
    xs = torch.cat([c.x for c in clients]).to(dev)
    ys = torch.cat([c.y for c in clients]).to(dev)
    offsets = [0]
    for cd in clients[:-1]:
        offsets.append(offsets[-1] + len(cd.x))
    plans = [
        [idx + off for idx in client_batches(len(cd.x), spec, cd.seed)]
        for cd, off in zip(clients, offsets, strict=True)
    ]
    steps = [len(p) for p in plans]
    # moved to the device once: each client's batches back to back, sliced per step
    flat = [torch.cat(p).to(dev) for p in plans]
    bounds = [[0, *torch.tensor([len(i) for i in p]).cumsum(0).tolist()] for p in plans]
    active_at = torch.tensor(
        [[t < s for s in steps] for t in range(max(steps))], device=dev
    )  # (T, G) bool
    loss_sum = torch.zeros(g_all, dtype=torch.float64, device=dev)

    vforward = vmapped_forward(model, shared_input=False)
    names = list(params)
    everyone = list(range(g_all))
    stopped = [False] * g_all
    for t in range(max(steps)):
        groups: dict[int, list[int]] = {}
        for c in everyone:
            if t < steps[c]:
                groups.setdefault(len(plans[c][t]), []).append(c)
        total = torch.zeros((), device=dev)
        for size, members in groups.items():
            rows = torch.stack([flat[c][bounds[c][t] : bounds[c][t + 1]] for c in members])
            if members == everyone:
                p_g, b_g, ids = params, buffers, None
            else:
                ids = torch.tensor(members, device=dev)
                p_g = {n: v[ids] for n, v in params.items()}  # differentiable gather
                b_g = {n: v[ids] for n, v in buffers.items()}  # copies; written back below
            logits = vforward(p_g, b_g, xs[rows])  # (g, size, classes)
            per_row = F.cross_entropy(
                logits.flatten(0, 1), ys[rows].flatten(), reduction="none"
            ).view(len(members), size)
            loss = per_row.mean(1)  # (g,) each client's mean over its real rows
            total = total + loss.sum()
            with torch.no_grad():
                if ids is None:
                    loss_sum += loss.detach().double()
                else:
                    loss_sum.index_add_(0, ids, loss.detach().double())
                    for n, v in buffers.items():
                        v[ids] = b_g[n]  # BatchNorm running statistics of this group
        grads = torch.autograd.grad(total, [params[n] for n in names], allow_unused=True)
        opt.step(dict(zip(names, grads, strict=True)), active_at[t])
        budget = spec.time_budget_s
        if budget is not None and (time.monotonic() - start) / g_all > budget:
            stopped = [t + 1 < s for s in steps]
            steps = [min(s, t + 1) for s in steps]
            break

    seconds = (time.monotonic() - start) / g_all
    losses = loss_sum.cpu().tolist()
    stacked = {**params, **buffers}
    # state-dict order, aliases (tied weights) resolved to the stacked tensor they share
    by_id = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    keys = {k: by_id.get(id(v), k) for k, v in model.state_dict(keep_vars=True).items()}
    return [
        LocalResult(
            state={k: stacked[src][c].detach().to("cpu").clone() for k, src in keys.items()},
            num_samples=len(clients[c].x),
            mean_loss=losses[c] / max(steps[c], 1),
            steps=steps[c],
            seconds=seconds,
            stopped_early=stopped[c],
        )
        for c in everyone
    ]
