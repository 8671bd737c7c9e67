"""In-process transport: virtual clients that run the agents' own training function."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from coordinator.transport.base import ClientUpdate, Task, Transport
from coordinator.transport.downlinks import Downlinks
from takfl.config.profile import TrainingSpec
from takfl.models import build_model
from takfl.state import State
from takfl.training import LocalResult, train_local
from takfl.vectorised_training import (
    ClientData,
    train_clients,
    vectorisable,
    worth_vectorising,
)
from takfl.wire.codecs import Codec

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class VirtualClient:
    client_id: str
    prototype: str
    x: torch.Tensor  # (N, C, H, W) private images
    y: torch.Tensor  # (N,) labels
    training: TrainingSpec


@dataclass(frozen=True)
class Carried:
    """What the coordinator reconstructs from a client's encoded update."""

    state: State  # full weights: the global + the decoded delta
    residual: State | None  # the client's error-feedback residual for its next update
    nbytes: int  # the encoded blob's size


def codec_roundtrip(
    trained: State, base: State, codec: Codec, residual: State | None, *, seed: int = 0
) -> Carried:
    """Send ``trained - base`` through ``codec`` as an agent would: with its error-feedback
    residual when the codec keeps one (a residual that no longer fits is dropped)."""
    from takfl.wire.codec import apply_delta, make_delta
    from takfl.wire.codecs import send_delta

    blob, delta, kept = send_delta(codec, make_delta(trained, base), base, residual, seed=seed)
    return Carried(apply_delta(base, delta), kept, len(blob))


class InProcessTransport(Transport):
    """Trains a virtual client when the engine asks for the next update.

    ``codecs`` (prototype -> resolved wire codec; a prototype not named, or None: no
    codec) applies the codec to each delta, so a simulation sees exactly what the
    coordinator would reconstruct from real agents; a codec with error feedback keeps
    each virtual client's residual across rounds, as an agent does. The update's
    ``upload_bytes`` metric is the encoded blob's size.

    ``downlinks`` (prototype -> downstream codec): a client of such a prototype is sent
    its global as a delta against the model it holds (:class:`Downlinks`), trains from
    the model it reconstructs, and sends its update against that; the update's
    ``download_bytes`` metric is the size of what it was sent and ``download_full`` 1
    when that was the full model (with ``codecs`` or ``downlinks`` set).

    ``vectorise`` (True: wherever possible; None: where :func:`worth_vectorising` says so;
    False: never): when the engine asks for the first update of a prototype's round, every
    queued task of that prototype with the same global weights and training settings trains
    at once (:func:`takfl.vectorised_training.train_clients`); the updates are then handed
    out one per call, in task order, as before. Models that cannot train together (dropout)
    and lone tasks train one by one with ``train_local``.
    """

    def __init__(
        self,
        clients: list[VirtualClient],
        *,
        num_classes: int,
        input_shape: tuple[int, int, int],
        device: torch.device | str = "cpu",
        codecs: Mapping[str, Codec] | None = None,
        downlinks: Mapping[str, Codec] | None = None,
        vectorise: bool | None = False,
    ) -> None:
        self._clients = {c.client_id: c for c in clients}
        self._queue: deque[Task] = deque()
        self._ready: dict[tuple[int, str], LocalResult] = {}  # trained with their peers
        self._models: dict[str, nn.Module] = {}
        self.num_classes = num_classes
        self.input_shape = input_shape
        self.device = torch.device(device)
        self.codecs = dict(codecs or {})
        self._residuals: dict[str, State] = {}  # client -> error-feedback residual
        self.downlinks = Downlinks(downlinks) if downlinks else None
        self._sent_bytes: dict[tuple[int, str], int] = {}  # (round, client) -> download
        self._full_bytes: dict[str, int] = {}  # prototype -> its full model's size
        self._sent_full: set[tuple[int, str]] = set()  # sent the full model, not a delta
        self.vectorise = vectorise

    def residual(self, client_id: str) -> State | None:
        """The error-feedback residual ``client_id`` will add to its next update."""
        return self._residuals.get(client_id)

    def clients(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for c in self._clients.values():
            out.setdefault(c.prototype, []).append(c.client_id)
        return out

    def send_tasks(self, tasks: list[Task]) -> None:
        for t in tasks:
            if t.client_id not in self._clients:
                raise KeyError(f"no virtual client {t.client_id!r}")
        if self.downlinks is not None or self.codecs:
            tasks = [self._down(t) for t in tasks]
        self._queue.extend(tasks)

    def _down(self, task: Task) -> Task:
        """``task`` as its client receives it: the global it reconstructs (the same object
        for every client holding the same model, so they still train together)."""
        if self.downlinks is None:  # the full fp32 model; its size is fixed by the layout
            from takfl.wire.downlink import full_blob

            if task.prototype not in self._full_bytes:
                self._full_bytes[task.prototype] = len(full_blob(task.global_state))
            self._sent_bytes[(task.round_id, task.client_id)] = self._full_bytes[task.prototype]
            return task
        plan = self.downlinks.plan(task.round_id, task.prototype, task.client_id, task.global_state)
        self.downlinks.holds(task.client_id, plan.digest)  # nothing is lost in process
        self._sent_bytes[(task.round_id, task.client_id)] = len(plan.blob)
        if plan.base is None:
            self._sent_full.add((task.round_id, task.client_id))
        return replace(task, global_state=plan.state)

    def _model(self, task: Task) -> nn.Module:
        if task.prototype not in self._models:
            self._models[task.prototype] = build_model(
                task.model.builder, self.num_classes, self.input_shape, **task.model.args
            )
        return self._models[task.prototype]

    def _spec(self, task: Task) -> TrainingSpec:
        return task.training or self._clients[task.client_id].training

    def _train_together(self, head: Task) -> None:
        """Train ``head`` and its queued peers (same round, prototype, global weights and
        training settings, distinct clients) at once; keep their results for next_update."""
        spec = self._spec(head)
        model = self._model(head)
        if vectorisable(model, spec) is not None:
            return
        if self.vectorise is None and not worth_vectorising(model, self.device):
            return
        peers: dict[str, Task] = {}
        for t in self._queue:
            if (
                t.round_id == head.round_id
                and t.prototype == head.prototype
                and t.global_state is head.global_state
                and self._spec(t) == spec
                and (t.round_id, t.client_id) not in self._ready
            ):
                peers.setdefault(t.client_id, t)
        if len(peers) < 2:
            return
        model.load_state_dict(head.global_state)
        tasks = list(peers.values())
        data = [
            ClientData(self._clients[t.client_id].x, self._clients[t.client_id].y, t.seed)
            for t in tasks
        ]
        results = train_clients(model, data, spec, device=self.device)
        for t, r in zip(tasks, results, strict=True):
            self._ready[(t.round_id, t.client_id)] = r

    def next_update(self, timeout: float) -> ClientUpdate | None:
        if not self._queue:
            return None
        head = self._queue[0]
        if self.vectorise is not False and (head.round_id, head.client_id) not in self._ready:
            self._train_together(head)
        task = self._queue.popleft()
        client = self._clients[task.client_id]
        result = self._ready.pop((task.round_id, task.client_id), None)
        if result is None:
            model = self._model(task)
            model.load_state_dict(task.global_state)
            result = train_local(
                model, client.x, client.y, self._spec(task), seed=task.seed, device=self.device
            )
        state = result.state
        metrics = {"train_loss": result.mean_loss, "train_s": result.seconds}
        codec = self.codecs.get(task.prototype)
        if codec is not None:
            residual = self._residuals.pop(task.client_id, None)
            carried = codec_roundtrip(state, task.global_state, codec, residual, seed=task.seed)
            state = carried.state
            if carried.residual is not None:
                self._residuals[task.client_id] = carried.residual
            metrics["upload_bytes"] = float(carried.nbytes)
        sent = self._sent_bytes.pop((task.round_id, task.client_id), None)
        if sent is not None:
            metrics["download_bytes"] = float(sent)
            full = (task.round_id, task.client_id) in self._sent_full
            self._sent_full.discard((task.round_id, task.client_id))
            metrics["download_full"] = float(full or self.downlinks is None)
        return ClientUpdate(
            round_id=task.round_id,
            prototype=task.prototype,
            client_id=task.client_id,
            num_samples=result.num_samples,
            state=state,
            metrics=metrics,
        )
