"""The agent's task loop: receive a task, train within the profile's limits, send the update.

The training is ``takfl.training.train_local``, the very function the
coordinator's simulation runs for its virtual clients.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edge_agent.limits import apply_limits, effective_training, over_memory, peak_rss_mb
from edge_agent.link import REGISTER_KEY, AgentIdentity, AgentLink, ReceivedTask
from edge_agent.telemetry import platform_info, task_telemetry
from takfl.config.profile import DeviceProfile, TrainingSpec
from takfl.models import build_model
from takfl.mqtt.client import MqttSettings
from takfl.training import train_local
from takfl.wire.telemetry import Telemetry
from takfl.wire.validation import check_layout

log = logging.getLogger(__name__)


@dataclass
class AgentStats:
    tasks_done: int = 0
    tasks_skipped: int = 0  # arrived past their deadline
    tasks_refused: int = 0  # global model mismatched, non-finite or unbuildable
    last_round: int = -1
    seconds_training: float = 0.0
    rounds: list[int] = field(default_factory=list)


def dictated_training(task: ReceivedTask) -> TrainingSpec | None:
    """Local-training settings the coordinator put in the task, if any."""
    t = task.message.training
    return None if t is None else TrainingSpec(**t.model_dump())


class RegistrationRefused(RuntimeError):
    """The coordinator refused this agent (unknown id, wrong prototype, bad signature)."""


class Agent:
    """One device's participation in a federation."""

    def __init__(
        self,
        profile: DeviceProfile,
        settings: MqttSettings,
        fleet: str,
        agent_id: str,
        secret: bytes,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        report: Callable[[str], None] = print,
    ) -> None:
        if len(x) == 0:
            raise ValueError("the agent has no private data to train on")
        self.profile = profile
        self.x, self.y = x, y
        self.report = report
        self.stats = AgentStats()
        self.stop_event = threading.Event()

        identity = AgentIdentity(
            agent_id, profile.prototype, secret, profile.name, profile.hardware_class, len(x)
        )
        self.platform = platform_info()
        self.link = AgentLink(settings, fleet, identity, telemetry=self._registration_telemetry)

    def _registration_telemetry(self) -> Telemetry:
        sent, received, retries = self.link.traffic()
        return task_telemetry(
            self.platform,
            self.profile.training,
            train_s=None,
            samples=0,
            bytes_sent=sent,
            bytes_received=received,
            retries=retries,
            deadline=None,
        )

    def handle(self, task: ReceivedTask) -> None:
        """Train on one task and send the update; a late task is skipped. (Repeated tasks
        never get here: the link answers them with the update it already sent.)"""
        msg = task.message
        if time.time() > msg.deadline:
            self.stats.tasks_skipped += 1
            log.info("skipping task of round %d: past its deadline", msg.round_id)
            return
        c, h, w = msg.input_shape
        try:
            model = build_model(msg.model.builder, msg.num_classes, (c, h, w), **msg.model.args)
        except (KeyError, TypeError, ValueError) as e:
            self.stats.tasks_refused += 1
            log.warning("refusing task of round %d: cannot build its model (%s)", msg.round_id, e)
            return
        verdict = check_layout(task.global_state, model.state_dict())
        if not verdict.accepted:  # a mismatched or non-finite global: refuse, keep serving
            self.stats.tasks_refused += 1
            log.warning("refusing the global model of round %d: %s", msg.round_id, verdict)
            return
        model.load_state_dict(task.global_state)
        spec = effective_training(self.profile.training, dictated_training(task))
        result = train_local(model, self.x, self.y, spec, seed=msg.seed)
        sent, received, retries = self.link.traffic()
        telemetry = task_telemetry(
            self.platform,
            spec,
            train_s=result.seconds,
            samples=result.steps * spec.batch_size
            if result.stopped_early
            else result.num_samples * spec.epochs,
            bytes_sent=sent,
            bytes_received=received,
            retries=retries,
            deadline=msg.deadline,
        )
        header = self.link.send_update(
            task,
            result.state,
            num_samples=result.num_samples,
            metrics={
                "train_loss": result.mean_loss,
                "train_s": result.seconds,
                "steps": float(result.steps),
                "peak_rss_mb": peak_rss_mb() or 0.0,
            },
            telemetry=telemetry,
        )
        warning = over_memory(spec)
        if warning:
            log.warning(warning)
        self.stats.tasks_done += 1
        self.stats.last_round = msg.round_id
        self.stats.rounds.append(msg.round_id)
        self.stats.seconds_training += result.seconds
        self.report(
            f"round {msg.round_id}: trained {result.steps} steps in {result.seconds:.1f}s "
            f"(loss {result.mean_loss:.3f}), sent {header.blob.size / 1024:.0f} KiB "
            f"{header.compression}"
        )

    def run(self, max_tasks: int | None = None) -> AgentStats:
        """Serve tasks until stopped (or after ``max_tasks``). Reconnects on its own."""
        applied = apply_limits(self.profile.training)
        self.report(
            f"agent {self.link.identity.agent_id} ({self.profile.name}, prototype "
            f"{self.profile.prototype}, {len(self.x)} samples, limits {applied})"
        )
        self.link.start(timeout=None)  # keeps trying in the background until the broker is up
        registered = False
        try:
            while not self.stop_event.is_set():
                if not registered:
                    ack = self.link.wait_ack(REGISTER_KEY, timeout=0.0)
                    if ack is not None and not ack.accepted:
                        raise RegistrationRefused(
                            f"the coordinator refused agent {self.link.identity.agent_id}: "
                            f"{ack.reason} {ack.detail}".strip()
                        )
                    if ack is not None:
                        registered = True
                        self.report("registered with the coordinator")
                task = self.link.next_task(timeout=0.5)
                if task is not None:
                    self.handle(task)
                    if max_tasks is not None and self.stats.tasks_done >= max_tasks:
                        break
        finally:
            self.link.close()
        return self.stats
