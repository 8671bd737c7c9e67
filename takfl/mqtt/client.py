"""A small paho-mqtt 2.x client shared by the coordinator and the agents.

- stable client id and a persistent session (MQTT 3.1.1 ``clean_session=False``,
  MQTT 5 ``clean_start=False`` with a session expiry), QoS 1 by default;
- subscriptions are made in ``on_connect``, so every reconnect restores them;
- topics are routed with ``message_callback_add``; the paho callbacks only copy
  the message into a bounded inbox (full: dropped and counted), one dispatcher
  thread hands it to its handler, so handlers never block the network loop and
  all run on the same thread; periodic hooks run on that thread too;
- reconnects with exponential backoff and jitter (``reconnect_delay_set`` is
  re-armed with a jittered delay after every disconnect or failed attempt);
- presence through a last will given at construction;
- username/password and optional TLS.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
Hook = Callable[[], None]


class MqttConnectError(ConnectionError):
    """The broker could not be reached or refused the connection."""


@dataclass(frozen=True)
class TlsSettings:
    ca_file: str | None = None  # CA bundle that signed the broker's certificate
    cert_file: str | None = None  # client certificate (mutual TLS), optional
    key_file: str | None = None
    insecure: bool = False  # skip the hostname check (lab setups with self-signed certs)


@dataclass(frozen=True)
class MqttSettings:
    """How to reach the broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: int = 30
    qos: Literal[0, 1, 2] = 1
    tls: TlsSettings | None = None
    reconnect_min_s: int = 1  # first reconnect delay; doubles up to reconnect_max_s
    reconnect_max_s: int = 30
    inbox_size: int = 1024  # received messages waiting for their handler
    outbox_size: int = 4096  # messages queued for sending (QoS > 0)
    max_inflight: int = 20  # unacknowledged QoS > 0 messages on the wire
    session_expiry_s: int = 7 * 24 * 3600  # MQTT 5: how long the broker keeps the session


@dataclass(frozen=True)
class Will:
    """Message the broker publishes when the client vanishes without disconnecting."""

    topic: str
    payload: bytes
    retain: bool = True


@dataclass
class ClientCounters:
    connects: int = 0
    disconnects: int = 0
    received: int = 0
    dropped: int = 0  # inbox full
    unrouted: int = 0  # no handler for the topic
    handler_errors: int = 0
    publish_refused: int = 0  # outbox full
    subscribe_refused: int = 0  # broker refused a subscription (ACL)
    bytes_sent: int = 0  # payload bytes handed to the broker connection
    bytes_received: int = 0  # payload bytes of routed messages


def backoff_delay(attempt: int, min_s: int, max_s: int, rng: random.Random) -> int:
    """Reconnect delay for the ``attempt``-th consecutive failure (1-based), in whole
    seconds: ``cap = min(max_s, min_s * 2**(attempt-1))``, drawn from [cap/2, cap]."""
    cap = min(max_s, min_s * 2 ** min(max(attempt - 1, 0), 20))
    return max(min_s, round(rng.uniform(cap / 2, cap)))


_STOP = object()


class MqttClient:
    """One connection to the broker. Register routes and hooks, then :meth:`start`.

    ``persistent=False`` gives a clean session (short-lived tools such as a status probe);
    services keep the default persistent session under a stable ``client_id``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        will: Will | None = None,
        tick_s: float = 0.25,
        seed: int | None = None,
        persistent: bool = True,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.persistent = persistent
        self.counters = ClientCounters()
        self.last_connect_error: str | None = None
        self._tick_s = tick_s
        self._rng = random.Random(seed)
        self._attempt = 0
        self._filters: list[str] = []
        self._connect_hooks: list[Hook] = []
        self._tick_hooks: list[Hook] = []
        self._inbox: queue.Queue[Any] = queue.Queue(maxsize=settings.inbox_size)
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # SUBACK of the current connection's subscriptions
        self._refused = threading.Event()  # the broker answered a CONNECT with a refusal
        self._settled = threading.Condition()  # notified when subscribed or refused
        self._sub_mid: int | None = None
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        v5 = settings.protocol == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if v5 else not persistent,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # A message is acknowledged after its handler ran, not on arrival: what the
            # broker sees acknowledged has been handled, and its in-flight window holds
            # further deliveries back while the handlers are behind.
            manual_ack=True,
        )
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_unrouted
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=settings.qos, retain=will.retain)
        self._client.max_inflight_messages_set(settings.max_inflight)
        self._client.max_queued_messages_set(settings.outbox_size)

    # -- configuration (before start) --------------------------------------------------
    def route(self, topic_filter: str, handler: Handler) -> None:
        """Subscribe to ``topic_filter`` (on every connect) and pass its messages to ``handler``.

        ``handler(topic, payload)`` runs on the dispatcher thread; exceptions are logged
        and counted.
        """
        self._filters.append(topic_filter)

        def enqueue(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            self.counters.received += 1
            self.counters.bytes_received += len(msg.payload)
            try:
                self._inbox.put_nowait((handler, msg.topic, bytes(msg.payload), msg.mid, msg.qos))
            except queue.Full:
                # Not acknowledged, so the broker delivers it again after a reconnect.
                self.counters.dropped += 1
                log.warning("%s: inbox full, deferred a message on %s", self.client_id, msg.topic)

        self._client.message_callback_add(topic_filter, enqueue)
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=self.settings.qos)

    def on_connected(self, hook: Hook) -> None:
        """Run ``hook`` after every successful (re)connect, on the network thread."""
        self._connect_hooks.append(hook)

    def every_tick(self, hook: Hook) -> None:
        """Run ``hook`` every ``tick_s`` seconds on the dispatcher thread."""
        self._tick_hooks.append(hook)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float | None = 10.0) -> None:
        """Connect in the background; wait up to ``timeout`` s for the first connection.

        Raises :class:`MqttConnectError` (after stopping) if it did not connect in time.
        With ``timeout=None`` it returns at once and keeps trying in the background.
        """
        s = self.settings
        c = self._client
        if s.username is not None:
            c.username_pw_set(s.username, s.password)
        if s.tls is not None:
            c.tls_set(
                ca_certs=s.tls.ca_file,
                certfile=s.tls.cert_file,
                keyfile=s.tls.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            c.tls_insecure_set(s.tls.insecure)
        c.reconnect_delay_set(s.reconnect_min_s, s.reconnect_min_s)
        self._worker = threading.Thread(
            target=self._dispatch, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._worker.start()
        if s.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry_s if self.persistent else 0
            c.connect_async(
                s.host, s.port, s.keepalive_s, clean_start=not self.persistent, properties=props
            )
        else:
            c.connect_async(s.host, s.port, s.keepalive_s)
        c.loop_start()
        if timeout is not None and not self._wait_settled(timeout):
            self.stop()
            raise MqttConnectError(
                f"{self.client_id}: no connection to {s.host}:{s.port} within {timeout:g} s "
                f"({self.last_connect_error or 'no answer'})"
            )

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (topic, payload; retained) if connected, disconnect, stop threads."""
        if final is not None and self._connected.is_set():
            info = self._client.publish(final[0], final[1], qos=self.settings.qos, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.debug("%s: final message not confirmed", self.client_id)
        self._stopping.set()
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        with contextlib.suppress(queue.Full):  # else the dispatcher sees _stopping in one tick
            self._inbox.put_nowait(_STOP)
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)

    # -- use ------------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until connected and the broker has answered this connection's subscriptions."""
        end = time.monotonic() + timeout
        if not self._connected.wait(timeout):
            return False
        return self._subscribed.wait(max(0.0, end - time.monotonic()))

    def _wait_settled(self, timeout: float) -> bool:
        """True once ready; False at once if the broker refused us, or after ``timeout``."""
        with self._settled:
            self._settled.wait_for(
                lambda: self._subscribed.is_set() or self._refused.is_set(), timeout
            )
        return self._subscribed.is_set()

    def _notify_settled(self) -> None:
        with self._settled:
            self._settled.notify_all()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Queue a message (QoS from settings). False if the outbox is full (counted).

        While disconnected, QoS > 0 messages wait in the outbox and go out on reconnect.
        """
        info = self._client.publish(topic, payload, qos=self.settings.qos, retain=retain)
        self.counters.bytes_sent += len(payload)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            self.counters.publish_refused += 1
            log.warning("%s: outbox full, refused a message on %s", self.client_id, topic)
            return False
        return info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)

    # -- paho callbacks (network thread): thin ----------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, _u: Any, _flags: Any, reason_code: ReasonCode, _props: Any
    ) -> None:
        if reason_code.is_failure:
            self.last_connect_error = str(reason_code)
            self._refused.set()
            self._notify_settled()
            log.warning("%s: connection refused: %s", self.client_id, reason_code)
            return
        self._attempt = 0
        client.reconnect_delay_set(self.settings.reconnect_min_s, self.settings.reconnect_min_s)
        if self._filters:
            qos = int(self.settings.qos)
            _, self._sub_mid = client.subscribe([(f, qos) for f in self._filters])
        else:
            self._subscribed.set()
            self._notify_settled()
        self.counters.connects += 1
        self._connected.set()
        for hook in self._connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("%s: connect hook failed", self.client_id)

    def _schedule_backoff(self) -> None:
        self._attempt += 1
        s = self.settings
        delay = backoff_delay(self._attempt, s.reconnect_min_s, s.reconnect_max_s, self._rng)
        self._client.reconnect_delay_set(delay, delay)

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        self.last_connect_error = "connection failed"
        self._schedule_backoff()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _flags: Any, reason_code: ReasonCode, _props: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if self._stopping.is_set():
            return
        self.counters.disconnects += int(was_connected)
        log.info("%s: disconnected (%s); reconnecting", self.client_id, reason_code)
        self._schedule_backoff()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _props: Any
    ) -> None:
        if mid == self._sub_mid:
            self._subscribed.set()
            self._notify_settled()
        refused = [c for c in codes if c.is_failure]
        if refused:
            self.counters.subscribe_refused += len(refused)
            log.warning(
                "%s: %d subscription(s) refused by the broker", self.client_id, len(refused)
            )

    def _on_unrouted(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.counters.unrouted += 1
        if msg.qos > 0:
            self._client.ack(msg.mid, msg.qos)  # nobody handles it; don't hold the window

    # -- dispatcher thread ------------------------------------------------------------------
    def _dispatch(self) -> None:
        next_tick = time.monotonic() + self._tick_s
        while not self._stopping.is_set():
            try:
                item = self._inbox.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None:
                handler, topic, payload, mid, qos = item
                try:
                    handler(topic, payload)
                except Exception:
                    self.counters.handler_errors += 1
                    log.exception("%s: handler for %s failed", self.client_id, topic)
                if qos > 0:
                    self._client.ack(mid, qos)
            if time.monotonic() >= next_tick:
                for hook in self._tick_hooks:
                    try:
                        hook()
                    except Exception:
                        log.exception("%s: periodic hook failed", self.client_id)
                next_tick = time.monotonic() + self._tick_s
