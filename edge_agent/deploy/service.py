"""``takfl-agent serve`` as a service: one MQTT connection that installs the releases of
the device's prototype, and the local inference endpoint. No training, no registration.

Presence as the training agent has it: a signed retained ``online`` status on connect,
``offline`` as last will and on close; the status also carries the inference block
(requests, errors, p50/p99, active release) and is published again, same connection
time, when that block changed, at most every ``status_every_s``. Routes:
``down/<me>/release`` -> the release channel, ``down/<me>/chunk`` -> its artifacts.
"""

from __future__ import annotations

import logging
import threading
from typing import Literal

from edge_agent.deploy.deployment import DeployConfig, Deployment
from edge_agent.serving.server import Endpoint, LocalServer
from edge_agent.serving.stats import StatusSchedule
from takfl.mqtt.client import MqttClient, MqttSettings, Will
from takfl.wire.errors import WireError
from takfl.wire.messages import InferenceStatus, Status, decode_chunk, encode_message
from takfl.wire.signing import sign
from takfl.wire.topics import Down, Topics, Up

log = logging.getLogger(__name__)


class ServeAgent:
    """The inference agent of one device (see the module docstring)."""

    def __init__(
        self,
        settings: MqttSettings,
        config: DeployConfig,
        endpoint: Endpoint,
        *,
        status_every_s: float = 30.0,
    ) -> None:
        self.config = config
        self.topics = Topics(config.fleet)
        me = config.agent_id
        self.client = MqttClient(settings, me, will=self._will)
        self.deployment = Deployment(config, publish=self.client.publish)
        self.schedule = StatusSchedule(status_every_s)
        self.server = LocalServer(self.deployment.app(), endpoint)
        self.ignored_chunks = 0
        self.stopped = threading.Event()
        channel = self.deployment.channel
        self.client.route(channel.offer_topic, channel.on_offer)
        self.client.route(self.topics.down(me, Down.CHUNK), self._on_chunk)
        self.client.on_connected(self._announce)
        self.client.every_tick(self._tick)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> ServeAgent:
        """Serve the installed release at once, then connect in the background (the local
        endpoint does not wait for the broker)."""
        self.deployment.open()
        self.server.start()
        self.client.start(timeout=None)
        return self

    def close(self) -> None:
        self.deployment.channel.wait_idle(30.0)
        self.client.stop(final=(self._status_topic(), self._status("offline")))
        self.server.close()

    def run(self) -> None:
        """Until :attr:`stopped` is set (SIGTERM, Ctrl-C)."""
        self.stopped.wait()

    # -- presence -------------------------------------------------------------------------
    def _status_topic(self) -> str:
        return self.topics.up(self.config.agent_id, Up.STATUS)

    def _status(
        self,
        state: Literal["online", "offline"],
        at: float | None = None,
        inference: InferenceStatus | None = None,
    ) -> bytes:
        when = self.client.connection_time if at is None else at
        msg = Status(agent_id=self.config.agent_id, state=state, time=when, inference=inference)
        return encode_message(sign(msg, self.config.secret))

    def _will(self, connection_time: float) -> Will:
        return Will(self._status_topic(), self._status("offline", connection_time))

    def _announce(self) -> None:
        block = self.deployment.inference_status()
        self.client.publish(
            self._status_topic(), self._status("online", inference=block), retain=True
        )
        self.schedule.sent(block)

    # -- dispatcher thread ------------------------------------------------------------------
    def _on_chunk(self, _topic: str, payload: bytes) -> None:
        try:
            chunk = decode_chunk(payload)
        except WireError as e:
            log.warning("%s: malformed chunk: %s", self.config.agent_id, e)
            return
        if not self.deployment.channel.on_chunk(chunk):
            self.ignored_chunks += 1

    def _tick(self) -> None:
        self.deployment.channel.tick()
        block = self.deployment.inference_status()
        if self.client.is_connected and self.schedule.due(block):
            status = self._status("online", inference=block)
            self.client.publish(self._status_topic(), status, retain=True)
            self.schedule.sent(block)
