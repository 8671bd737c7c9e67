"""The agent's task loop: receive a task, train within the profile's limits, send the update.

The training is ``takfl.training.train_local``, the very function the
coordinator's simulation runs for its virtual clients.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from edge_agent.codec_state import CodecState
from edge_agent.limits import apply_limits, over_memory, peak_rss_mb
from edge_agent.link import REGISTER_KEY, AgentIdentity, AgentLink, LinkPolicy, ReceivedTask
from edge_agent.secure_round import run_secure_round
from edge_agent.telemetry import platform_info, task_telemetry
from edge_agent.watch import LinkWatch
from takfl.config.profile import DeviceProfile, TrainingSpec
from takfl.models import build_model
from takfl.mqtt.client import UNSUPPORTED_PROTOCOL, MqttSettings
from takfl.mqtt.probe import connack_reason
from takfl.ondevice import ProgramError, require_executorch, train_program
from takfl.training import LocalResult, train_local
from takfl.wire.telemetry import Telemetry
from takfl.wire.validation import check_layout

if TYPE_CHECKING:
    from tuf.api.metadata import Root

    from edge_agent.serving.server import Endpoint, LocalServer

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 10.0  # wait for the broker's answer to the MQTT 5 question
PROBE_RETRY_S = 2.0  # between questions while the broker is not up


@dataclass(kw_only=True)
class AgentStats:
    tasks_done: int = 0
    tasks_skipped: int = 0  # arrived past their deadline
    tasks_refused: int = 0  # global model mismatched, non-finite or unbuildable
    last_round: int = -1
    seconds_training: float = 0.0
    rounds: list[int] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ReleaseOptions:
    """Install the fleet's releases beside training (``run --release-root``), and serve
    the active model on ``endpoint`` when given (``--serve``)."""

    root: Root  # the fleet's release root (root.json)
    state_dir: Path  # A/B slots and trust state
    endpoint: Endpoint | None = None


class NoProgram(RuntimeError):
    """A task for an ExecuTorch agent came without a training program."""


def train_with_torch(
    task: ReceivedTask, model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainingSpec
) -> LocalResult:
    """``model`` holds the task's global weights; trained in place."""
    return train_local(model, x, y, spec, seed=task.message.seed)


def train_with_executorch(
    task: ReceivedTask, model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainingSpec
) -> LocalResult:
    """Through the task's training program, from the task's global weights (``model``
    only vouches that they fit the task's architecture)."""
    del model
    if task.program is None:
        raise NoProgram(
            f"round {task.message.round_id}: the coordinator offered no training program, "
            "and this profile trains through ExecuTorch"
        )
    return train_program(task.program, task.global_state, x, y, spec, seed=task.message.seed)


Trainer = Callable[[ReceivedTask, nn.Module, torch.Tensor, torch.Tensor, TrainingSpec], LocalResult]
TRAINERS: dict[str, Trainer] = {"torch": train_with_torch, "executorch": train_with_executorch}


class RegistrationRefused(RuntimeError):
    """The coordinator refused this agent (unknown id, wrong prototype, bad signature), or
    the broker refused its login."""


def login_refused(reason: str | None) -> bool:
    """True for a broker answer that retrying with the same credentials cannot change."""
    return reason is not None and any(w in reason.lower() for w in ("authori", "password"))


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
        patience_s: float = 60.0,
        releases: ReleaseOptions | None = None,
        codec_dir: Path | None = None,
    ) -> None:
        if len(x) == 0:
            raise ValueError("the agent has no private data to train on")
        self.profile = profile
        self.x, self.y = x, y
        self.report = report
        self.stats = AgentStats()
        self.stop_event = threading.Event()
        self.trainer = TRAINERS[profile.training.backend]
        if profile.training.backend == "executorch":
            require_executorch(f"profile {profile.name!r}")
        self.policy = LinkPolicy(programs=profile.training.backend == "executorch")
        self.settings = settings
        self.fleet = fleet
        self.patience_s = patience_s
        self.releases = releases
        self._denials: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.identity = AgentIdentity(
            agent_id=agent_id,
            prototype=profile.prototype,
            secret=secret,
            profile=profile.name,
            hardware_class=profile.hardware_class,
            num_samples=len(x),
        )
        self.platform = platform_info()
        # the error-feedback residual and received globals, kept across links (and, with
        # a folder, across restarts)
        self.codec_state = CodecState(codec_dir)
        self.link = self._new_link()

    def _new_link(self) -> AgentLink:
        link = AgentLink(
            self.settings,
            self.fleet,
            self.identity,
            policy=self.policy,
            telemetry=self._registration_telemetry,
            codec_state=self.codec_state,
        )
        link.client.on_publish_denied(lambda topic, reason: self._denials.put((topic, reason)))
        return link

    def _choose_protocol(self, watch: LinkWatch) -> None:
        """With MQTT 5 asked for, ask the broker first (waiting, with reports, until it
        answers); a 3.1.1-only broker such as the embedded one gets 3.1.1."""
        while self.settings.protocol == "5" and not self.stop_event.is_set():
            reason = connack_reason(self.settings, PROBE_TIMEOUT_S)
            if reason == UNSUPPORTED_PROTOCOL:
                self.settings = replace(self.settings, protocol="3.1.1")
                self.link = self._new_link()
                self.report(
                    f"the broker at {self.settings.host}:{self.settings.port} speaks MQTT 3.1.1 "
                    "only; using 3.1.1, where a refused message is not reported"
                )
            if reason is not None:
                return
            line = watch.tick(
                time.monotonic(), connected=False, registered=False, last_error="no answer"
            )
            if line:
                self.report(line)
            self.stop_event.wait(PROBE_RETRY_S)

    def _watch(self, watch: LinkWatch, registered: bool) -> None:
        """Report what keeps the agent waiting, with the fix (no silent waits)."""
        client = self.link.client
        error = client.last_connect_error
        refused = client.refused  # a CONNACK refusal, not a failed TCP or TLS connection
        if not client.is_connected and refused is not None:
            line = watch.refused(refused)
            if line:
                self.report(line)
        while not self._denials.empty():
            line = watch.denied(*self._denials.get())
            if line:
                self.report(line)
        line = watch.tick(
            time.monotonic(), connected=client.is_connected, registered=registered, last_error=error
        )
        if line:
            self.report(line)

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
        spec = self.profile.training.with_dictated(msg.training)  # the coordinator's say
        try:
            result = self.trainer(task, model, self.x, self.y, spec)
        except (NoProgram, ProgramError) as e:
            self.stats.tasks_skipped += 1
            log.warning("skipping task of round %d: %s", msg.round_id, e)
            return
        peak = peak_rss_mb() or 0.0
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
        metrics = {
            "train_loss": result.mean_loss,
            "train_s": result.seconds,
            "steps": float(result.steps),
            "peak_rss_mb": peak,
        }
        if msg.secagg is not None:
            header = run_secure_round(
                msg,
                result.state,
                task.global_state,
                self.link.secure_inbox,
                self.link.secure_send(),
                num_samples=result.num_samples,
                metrics=metrics,
                telemetry=telemetry,
                give_up=lambda: self.stop_event.is_set() or self.link.has_task(),
            )
            if header is None:
                self.stats.tasks_skipped += 1
                return
        else:
            header = self.link.send_update(
                task,
                result.state,
                num_samples=result.num_samples,
                metrics=metrics,
                telemetry=telemetry,
            )
        warning = over_memory(spec)
        if warning:
            log.warning(warning)
        self.stats.tasks_done += 1
        self.stats.last_round = msg.round_id
        self.stats.rounds.append(msg.round_id)
        self.stats.seconds_training += result.seconds
        what = "a masked input (secure round)" if msg.secagg is not None else header.compression
        self.report(
            f"round {msg.round_id}: trained {result.steps} steps through {spec.backend} "
            f"in {result.seconds:.1f}s "
            f"(loss {result.mean_loss:.3f}), sent {header.blob.size} bytes "
            f"{what}, peak RSS {peak:.0f} MB"
        )

    def run(self, max_tasks: int | None = None) -> AgentStats:
        """Serve tasks until stopped (or after ``max_tasks``). Reconnects on its own."""
        applied = apply_limits(self.profile.training)
        self.report(
            f"agent {self.link.identity.agent_id} ({self.profile.name}, prototype "
            f"{self.profile.prototype}, {len(self.x)} samples, limits {applied})"
        )
        registered = False
        watch = LinkWatch(
            agent_id=self.identity.agent_id,
            fleet=self.fleet,
            broker=f"{self.settings.host}:{self.settings.port}",
            started=time.monotonic(),
            patience_s=self.patience_s,
        )
        self._choose_protocol(watch)
        server = self._serve_releases()
        self.link.start(timeout=None)  # keeps trying in the background until the broker is up
        try:
            while not self.stop_event.is_set():
                self._watch(watch, registered)
                refused = self.link.client.refused
                if not registered and login_refused(refused):
                    raise RegistrationRefused(
                        f"the broker refused the login of agent {self.link.identity.agent_id} "
                        f"({refused}): it is not provisioned there, or its secret or "
                        "password is wrong"
                    )
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
            if server is not None:
                server.close()
        return self.stats

    def _serve_releases(self) -> LocalServer | None:
        """Attach release installs to the link (and start the local inference endpoint)
        when asked for; the active release serves at once, before the broker answers."""
        options = self.releases
        if options is None:
            return None
        from edge_agent.deploy.deployment import DeployConfig, Deployment
        from edge_agent.serving.server import LocalServer

        config = DeployConfig(
            profile=self.profile,
            fleet=self.fleet,
            agent_id=self.identity.agent_id,
            secret=self.identity.secret,
            root=options.root,
            state_dir=options.state_dir,
        )
        deployment = Deployment(config, publish=self.link.client.publish)
        deployment.open()
        self.link.serve_releases(deployment)
        if options.endpoint is None:
            return None
        server = LocalServer(deployment.app(), options.endpoint).start()
        self.report(f"serving {self.profile.prototype} releases on {server.endpoint}")
        return server
