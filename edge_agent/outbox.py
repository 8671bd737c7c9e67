"""The agent's sent updates until the coordinator acknowledges them.

An update goes out as its signed header, then the chunks of its blob. The outbox keeps
the blob in a bounded :class:`BlobStore` to answer the coordinator's chunk requests
(within the :class:`ResendLimits`), announces a header again every ``ack_timeout_s``
until it is acknowledged or the task's deadline passes, answers a task the coordinator
repeats with the update already sent (every header published again is signed anew: a
fresh ``sent_at`` and nonce, the same content), and keeps the acks received (of updates, by blob
digest, and of the registration) for :meth:`UpdateOutbox.wait_ack`. The bookkeeping is
:class:`edge_agent.retries.UpdateRetries`; this class adds the lock, the waiting and the
publishing. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from edge_agent.retries import UpdateRetries
from takfl.mqtt.blobs import BlobSender, BlobStore
from takfl.mqtt.client import MqttClient
from takfl.mqtt.ratelimit import ResendLimiter, ResendLimits
from takfl.wire.messages import Ack, ChunkRequest, UpdateHeader, encode_message
from takfl.wire.signing import restamp
from takfl.wire.topics import Topics, Up
from takfl.wire.update import PreparedUpdate

log = logging.getLogger(__name__)


class UpdateOutbox:
    """Updates of agent ``agent_id`` sent through ``client`` (see the module docstring)."""

    def __init__(
        self,
        client: MqttClient,
        topics: Topics,
        agent_id: str,
        *,
        secret: bytes,
        ack_timeout_s: float,
        max_sent_blobs: int,
        resend: ResendLimits,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.agent_id = agent_id
        self._secret = secret
        self.clock = clock
        self.update_topic = topics.up(agent_id, Up.UPDATE)
        self.chunk_topic = topics.up(agent_id, Up.CHUNK)
        self.sender = BlobSender(
            client, BlobStore(max_blobs=max_sent_blobs), ResendLimiter(resend, clock=clock)
        )
        # Unacknowledged headers and updates already sent, by (round, global digest): a task
        # repeated by a coordinator that restarted mid-round is answered with the same update.
        self.retries = UpdateRetries(
            ack_timeout_s=ack_timeout_s,
            max_answered=max_sent_blobs,
            clock=clock,
            wall_clock=wall_clock,
        )
        self.requests_answered = 0  # chunk requests answered with at least one chunk
        self.header_retries = 0  # headers announced again for want of an ack
        self._cond = threading.Condition()

    def send(
        self, prepared: PreparedUpdate, deadline: float, chunk_indices: Iterable[int] | None
    ) -> UpdateHeader:
        """Keep the blob, publish the header (stamped now), then the chunks (all, or
        ``chunk_indices``); returns the header as sent."""
        header = restamp(prepared.header, self._secret)
        self.sender.keep(prepared.blob, header.blob.chunk_size)
        with self._cond:
            self.retries.sent(header, deadline)
        self._publish(header, chunk_indices)
        return header

    def answer_again(self, task_key: tuple[int, str]) -> None:
        """Send the update already sent for a task repeated with this ``(round, global
        digest)`` again, if one is remembered (its blob kept)."""
        with self._cond:
            header = self.retries.answer_for(task_key)
        if header is None:
            return
        log.info(
            "%s: task of round %d repeated; sending the same update again",
            self.agent_id,
            task_key[0],
        )
        self._publish(restamp(header, self._secret))

    def answer(self, request: ChunkRequest, requester: str) -> None:
        """Publish the chunks of a kept blob ``request`` asks for, as far as allowed."""
        sent = self.sender.answer(self.chunk_topic, request, requester)
        self.requests_answered += int(sent > 0)

    def run_of(self, digest: str) -> str | None:
        """The run of the update whose blob is ``digest``, None if none is kept."""
        with self._cond:
            return self.retries.run_of(digest)

    def acknowledged(self, key: str, ack: Ack) -> None:
        """The coordinator answered ``key`` (a blob digest or the registration key)."""
        with self._cond:
            self.retries.acknowledged(key, ack)
            self._cond.notify_all()

    def wait_ack(self, key: str, timeout: float) -> Ack | None:
        """The ack of ``key``, or None after ``timeout`` s."""
        end = self.clock() + timeout
        with self._cond:
            while (ack := self.retries.ack(key)) is None:
                left = end - self.clock()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return ack

    def retry_due(self) -> None:
        """Announce again the headers whose ack is overdue."""
        with self._cond:
            due = self.retries.due()
        self.header_retries += len(due)
        for header in due:
            self.client.publish(self.update_topic, encode_message(restamp(header, self._secret)))

    def _publish(self, header: UpdateHeader, chunk_indices: Iterable[int] | None = None) -> None:
        self.client.publish(self.update_topic, encode_message(header))
        self.sender.publish(self.chunk_topic, header.blob.digest, chunk_indices)
