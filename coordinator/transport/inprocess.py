"""In-process transport: virtual clients that run the agents' own training function."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from coordinator.transport.base import ClientUpdate, Task, Transport
from takfl.config.profile import TrainingSpec
from takfl.models import build_model
from takfl.training import train_local

log = logging.getLogger(__name__)


@dataclass
class VirtualClient:
    client_id: str
    prototype: str
    x: torch.Tensor  # (N, C, H, W) private images
    y: torch.Tensor  # (N,) labels
    training: TrainingSpec


def codec_roundtrip(
    trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor], compression: str
) -> dict[str, torch.Tensor]:
    """What the coordinator reconstructs from a delta sent with ``compression``."""
    from takfl.wire.codec import apply_delta, decode_state, encode_state, make_delta

    delta = make_delta(trained, base)
    return apply_delta(base, decode_state(encode_state(delta, compression)))


class InProcessTransport(Transport):
    """Trains a virtual client when the engine asks for the next update.

    ``compression`` (fp32/fp16/int8, or one per prototype) applies the wire codec
    to each delta, so a simulation sees exactly what the coordinator would
    reconstruct from real agents.
    """

    def __init__(
        self,
        clients: list[VirtualClient],
        *,
        num_classes: int,
        input_shape: tuple[int, int, int],
        device: torch.device | str = "cpu",
        compression: str | dict[str, str] | None = None,
    ) -> None:
        self._clients = {c.client_id: c for c in clients}
        self._queue: deque[Task] = deque()
        self._models: dict[str, nn.Module] = {}
        self.num_classes = num_classes
        self.input_shape = input_shape
        self.device = torch.device(device)
        self.compression = compression

    def clients(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for c in self._clients.values():
            out.setdefault(c.prototype, []).append(c.client_id)
        return out

    def send_tasks(self, tasks: list[Task]) -> None:
        for t in tasks:
            if t.client_id not in self._clients:
                raise KeyError(f"no virtual client {t.client_id!r}")
        self._queue.extend(tasks)

    def _model(self, task: Task) -> nn.Module:
        if task.prototype not in self._models:
            self._models[task.prototype] = build_model(
                task.model.builder, self.num_classes, self.input_shape, **task.model.args
            )
        return self._models[task.prototype]

    def next_update(self, timeout: float) -> ClientUpdate | None:
        if not self._queue:
            return None
        task = self._queue.popleft()
        client = self._clients[task.client_id]
        model = self._model(task)
        model.load_state_dict(task.global_state)
        spec = task.training or client.training
        result = train_local(model, client.x, client.y, spec, seed=task.seed, device=self.device)
        state = result.state
        mode = (
            self.compression.get(task.prototype)
            if isinstance(self.compression, dict)
            else self.compression
        )
        if mode is not None:
            state = codec_roundtrip(state, task.global_state, mode)
        return ClientUpdate(
            task.round_id,
            task.prototype,
            task.client_id,
            result.num_samples,
            state,
            {"train_loss": result.mean_loss, "train_s": result.seconds},
        )
