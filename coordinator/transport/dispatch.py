"""Task dispatch: the run, which agent has which task this round, signed task messages,
task acknowledgements, re-sends of unacknowledged tasks (each signed anew: a fresh
``sent_at`` and nonce; each after twice the wait of the one before, :class:`RetryPolicy`),
and which chunk requests for a global model an agent may make.
No broker: the MQTT transport publishes what this decides.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from coordinator.transport.base import Task
from takfl.config.profile import CommsSpec
from takfl.mqtt.retry import RetryPolicy
from takfl.state import State
from takfl.wire.messages import (
    Ack,
    BlobRef,
    InputNorm,
    ModelRef,
    SecAggTask,
    TaskMessage,
    TrainingRef,
)
from takfl.wire.secure import SECURE_COMPRESSION
from takfl.wire.signing import restamp, sign
from takfl.wire.validation import AgentRecord


@dataclass(kw_only=True)
class Assignment:
    message: TaskMessage
    reference: State  # the global the agent holds, its delta's base (CPU)
    sent_at: float
    wait: float  # seconds after sent_at before the task is sent again
    sends: int = 1
    acked: bool = False


def task_message(
    task: Task,
    ref: BlobRef,
    secret: bytes,
    *,
    comms: CommsSpec,
    num_classes: int,
    input_shape: tuple[int, int, int],
    program: BlobRef | None = None,
    run: str = "",
    input_norm: InputNorm | None = None,
    base: str | None = None,
    model_digest: str | None = None,
    secagg: SecAggTask | None = None,
) -> TaskMessage:
    """The signed wire form of ``task`` in run ``run``, whose global model is the blob
    ``ref`` (with ``base``: a delta against that model, making ``model_digest``);
    ``program``: the training program offered with it, if any; ``input_norm``: how the
    coordinator's data is standardised; ``secagg``: the agent's part in a secure round
    (its update is then a masked input, and the compression ``fp32``)."""
    msg = TaskMessage(
        run=run,
        round_id=task.round_id,
        agent_id=task.client_id,
        prototype=task.prototype,
        model=ModelRef(builder=task.model.builder, args=dict(task.model.args)),
        training=None if task.training is None else TrainingRef(**task.training.dictated()),
        num_classes=num_classes,
        input_shape=input_shape,
        seed=task.seed,
        deadline=task.deadline,
        compression=comms.compression if secagg is None else SECURE_COMPRESSION,
        chunk_size=comms.chunk_size_kib * 1024,
        blob=ref,
        base=base,
        model_digest=model_digest if base is not None else None,
        program=program,
        input_norm=input_norm,
        secagg=secagg,
    )
    return sign(msg, secret)


class TaskDispatch:
    """Assignments of the current round of run ``run``. Thread-safe (engine and dispatcher
    threads). Once :meth:`finish` is called the run has ended: no task is sent again."""

    def __init__(
        self,
        registry: Mapping[str, AgentRecord],
        *,
        retry: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
        run: str = "",
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.retry = retry
        self.rng = rng or random.Random()
        self.clock = clock
        self.run = run
        self.finished = False
        self.round = -1
        self._assignments: dict[str, Assignment] = {}
        self._lock = threading.Lock()

    def check(self, tasks: list[Task]) -> None:
        """Raise if a task names an agent that is not provisioned for its prototype."""
        for t in tasks:
            record = self.registry.get(t.client_id)
            if record is None:
                raise KeyError(f"no provisioned agent {t.client_id!r}")
            if record.prototype != t.prototype:
                raise ValueError(
                    f"agent {t.client_id!r} trains {record.prototype!r}, not {t.prototype!r}"
                )

    def assign(self, pairs: list[tuple[Task, TaskMessage]]) -> bool:
        """Record the tasks of the newest round; True if that round is new."""
        if not pairs:
            return False
        with self._lock:
            newest = max(t.round_id for t, _ in pairs)
            started = newest > self.round
            if started:
                self.round = newest
                self._assignments = {}
            for t, msg in pairs:
                if t.round_id == self.round:
                    ref = {k: v.detach().to("cpu") for k, v in t.global_state.items()}
                    self._assignments[t.client_id] = Assignment(
                        message=msg,
                        reference=ref,
                        sent_at=self.clock(),
                        wait=self.retry.draw(1, self.rng),
                    )
        return started

    def reassign(self, agent: str, message: TaskMessage, reference: State) -> bool:
        """Replace ``agent``'s task of the current round by ``message`` (sent now, not yet
        acknowledged); False when it has no task of that round."""
        with self._lock:
            a = self._assignments.get(agent)
            if a is None or a.message.round_id != message.round_id:
                return False
            self._assignments[agent] = Assignment(
                message=message,
                reference=reference,
                sent_at=self.clock(),
                wait=self.retry.draw(1, self.rng),
            )
            return True

    def current_round(self) -> int:
        """The round of the current assignments (-1 before the first), without copying them."""
        with self._lock:
            return self.round

    def current(self) -> tuple[int, dict[str, Assignment]]:
        """The round and a snapshot of its assignments (a copy: O(agents))."""
        with self._lock:
            return self.round, dict(self._assignments)

    def assignment(self, agent: str) -> Assignment | None:
        with self._lock:
            return self._assignments.get(agent)

    def acknowledged(self, agent: str, ack: Ack) -> bool:
        """Note an agent's ack of its task; True if it matched the current assignment."""
        with self._lock:
            a = self._assignments.get(agent)
            if (
                a is None
                or ack.subject != "task"
                or ack.run != self.run
                or ack.round_id != a.message.round_id
                or ack.digest != a.message.blob.digest
            ):
                return False
            a.acked = True
            return True

    def may_fetch(self, agent: str, digest: str) -> bool:
        """An agent may ask only for chunks of its own current task's model or program."""
        a = self.assignment(agent)
        if a is None:
            return False
        program = a.message.program
        return digest == a.message.blob.digest or (program is not None and digest == program.digest)

    def due_retries(self) -> list[TaskMessage]:
        """Unacknowledged tasks whose deadline has not passed and whose retry wait has
        passed since they were last sent, each signed anew (nothing once the run finished)."""
        now, wall = self.clock(), time.time()
        due = []
        with self._lock:
            if self.finished:
                return []
            for a in self._assignments.values():
                if not a.acked and now - a.sent_at >= a.wait and wall < a.message.deadline:
                    a.sends += 1
                    a.sent_at = now
                    a.wait = self.retry.draw(a.sends, self.rng)
                    a.message = restamp(a.message, self.registry[a.message.agent_id].secret)
                    due.append(a.message)
        return due

    def awaited(self, delivered: Callable[[int], set[str]]) -> list[str]:
        """Agents of the current round whose update is still wanted: not among
        ``delivered(round)`` and their task's deadline not passed."""
        now = time.time()
        with self._lock:
            round_id, assignments = self.round, dict(self._assignments)
        done = delivered(round_id)
        return [a for a, x in assignments.items() if a not in done and now < x.message.deadline]

    def finish(self) -> None:
        """The run has ended: updates are answered ``run_finished``, tasks not re-sent."""
        with self._lock:
            self.finished = True
