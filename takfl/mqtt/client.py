"""A small paho-mqtt 2.x client shared by the coordinator and the agents.

- stable client id and a persistent session (MQTT 3.1.1 ``clean_session=False``,
  MQTT 5 ``clean_start=False`` with a session expiry), QoS 1 by default;
- subscriptions are made in ``on_connect``, so every reconnect restores them;
- topics are routed with ``message_callback_add``; the paho callbacks only copy
  the message into a bounded inbox, one dispatcher thread hands it to its handler,
  so handlers all run on the same thread; periodic hooks run on that thread too. A
  full inbox holds the network loop back until the dispatcher takes a message (counted
  in ``inbox_waits``): nothing is dropped, the socket is not read meanwhile, and the
  broker keeps what follows in the client's queue (Mosquitto's ``max_queued_messages``,
  which provisioning sizes with the fleet). Only a client that is stopping drops
  what it could not queue (unacknowledged: the broker delivers it again to the
  session's next connection);
- reconnects with exponential backoff and jitter (``reconnect_delay_set`` is
  re-armed with a jittered delay after every disconnect or failed attempt);
- presence through a last will, armed afresh before every connection attempt when
  given as a function of the connection's start time (``connection_time``), so that
  a signed will and the ``online`` status sent on the connection carry the same time;
- with MQTT 5 (``protocol="5"``) a refused publish is visible: the broker's PUBACK carries
  a reason code (e.g. "Not authorized" from an ACL), counted, logged and passed to the
  ``on_publish_denied`` hooks; MQTT 3.1.1 acknowledges a denied publish like any other;
- username/password and optional TLS; a failed TLS handshake is logged with its reason
  (paho only says that the connection failed, so the handshake is tried once more
  directly to learn why);
- a received message larger than ``max_payload_bytes`` is dropped (and counted) before
  it is copied or queued, and so is an empty one: an empty payload is never a message
  (it is how a retained message is cleared).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import secrets
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from takfl.wire.messages import MAX_PACKET_BYTES

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
Admit = Callable[[str], bool]  # topic -> may this message be queued?
Hook = Callable[[], None]
DenialHook = Callable[[str, str], None]  # (topic, reason)
UNSUPPORTED_PROTOCOL = "Unsupported protocol version"  # CONNACK of a 3.1.1-only broker to MQTT 5


class MqttConnectError(ConnectionError):
    """The broker could not be reached or refused the connection."""


@dataclass(frozen=True, kw_only=True)
class TlsSettings:
    ca_file: str | None = None  # CA bundle that signed the broker's certificate
    cert_file: str | None = None  # client certificate (mutual TLS), optional
    key_file: str | None = None
    insecure: bool = False  # skip the hostname check (lab setups with self-signed certs)


@dataclass(frozen=True, kw_only=True)
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
    max_payload_bytes: int = MAX_PACKET_BYTES  # larger received messages are dropped unread


@dataclass(frozen=True)
class Will:
    """Message the broker publishes when the client vanishes without disconnecting."""

    topic: str
    payload: bytes
    retain: bool = True


@dataclass(kw_only=True)
class ClientCounters:
    connects: int = 0
    disconnects: int = 0
    received: int = 0
    dropped: int = 0  # not queued because the client was stopping (redelivered later)
    inbox_waits: int = 0  # messages that waited for room in the inbox (backpressure)
    unrouted: int = 0  # no handler for the topic
    handler_errors: int = 0
    oversized: int = 0  # dropped for exceeding max_payload_bytes
    empty: int = 0  # empty payloads (a retained message cleared), dropped
    refused_admission: int = 0  # dropped by a route's admit check (e.g. a rate limit)
    publish_refused: int = 0  # outbox full
    subscribe_refused: int = 0  # broker refused a subscription (ACL)
    publish_denied: int = 0  # MQTT 5: the broker's PUBACK refused a message (ACL)
    bytes_sent: int = 0  # payload bytes handed to the broker connection
    bytes_received: int = 0  # payload bytes of routed messages


def unique_client_id(login: str) -> str:
    """``<login>-<8 hex digits>``: the client id of a monitor or service that may run more
    than once under one broker login (agents and the coordinator keep a stable id)."""
    return f"{login}-{secrets.token_hex(4)}"


def backoff_delay(attempt: int, min_s: int, max_s: int, rng: random.Random) -> int:
    """Reconnect delay for the ``attempt``-th consecutive failure (1-based), in whole
    seconds: ``cap = min(max_s, min_s * 2**(attempt-1))``, drawn from [cap/2, cap]."""
    cap = min(max_s, min_s * 2 ** min(max(attempt - 1, 0), 20))
    return max(min_s, round(rng.uniform(cap / 2, cap)))


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """Client TLS context: verify the broker against ``ca_file`` (the system store when
    None), present a client certificate when given."""
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file is not None:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as e:
        raise MqttConnectError(f"cannot load the TLS files ({e})") from e
    ctx.check_hostname = not tls.insecure
    return ctx


def tls_diagnosis(settings: MqttSettings, ctx: ssl.SSLContext, timeout: float = 5.0) -> str | None:
    """Why a TLS connection to the broker fails (None if a handshake succeeds now)."""
    host = settings.host
    try:
        with (
            socket.create_connection((host, settings.port), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname=host),
        ):
            return None
    except ssl.SSLCertVerificationError as e:
        return (
            f"TLS handshake with {host}:{settings.port} failed: certificate verify failed "
            f"({e.verify_message}); check the CA file (--ca-file) and the broker's host name"
        )
    except ssl.SSLError as e:
        return f"TLS handshake with {host}:{settings.port} failed: {e.reason or e}"
    except OSError as e:
        return f"cannot reach {host}:{settings.port}: {e}"


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
        will: Will | Callable[[float], Will] | None = None,
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
        # A network thread held back by a full inbox resumes once it is half empty (then
        # reads on in a burst), not after every message taken: one wake-up per half inbox.
        self._room = threading.Event()
        self._held = False
        self._low_water = settings.inbox_size // 2
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # SUBACK of the current connection's subscriptions
        self._refused = threading.Event()  # the broker answered a CONNECT with a refusal
        self._settled = threading.Condition()  # notified when subscribed or refused
        self._sub_mid: int | None = None
        # PUBACK bookkeeping. Never held while calling paho: paho runs on_publish under its
        # own lock, which its publish() takes too.
        self._pub_lock = threading.Lock()
        self._pub_topics: OrderedDict[int, str] = OrderedDict()  # mid -> topic, awaiting PUBACK
        self._early: OrderedDict[int, ReasonCode] = OrderedDict()  # PUBACKs before bookkeeping
        self._confirm: dict[int, tuple[threading.Event, list[ReasonCode]]] = {}
        self._denial_hooks: list[DenialHook] = []
        self.last_publish_denial: tuple[str, str] | None = None  # (topic, reason)
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
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_unrouted
        self._ssl_context: ssl.SSLContext | None = None
        self._will = will
        self.connection_time = 0.0  # wall-clock time the current connection's will was armed
        self._arm_will()
        self._client.max_inflight_messages_set(settings.max_inflight)
        # The outbox bound is this client's (unacknowledged QoS > 0 messages, counted until
        # their PUBACK): paho's own cannot change once connected (reserve_outbox).
        self._outbox_size = settings.outbox_size
        self._client.max_queued_messages_set(0)

    def _arm_will(self) -> None:
        """Set the will for the next connection attempt (before paho reconnects)."""
        self.connection_time = time.time()
        will = self._will(self.connection_time) if callable(self._will) else self._will
        if will is not None:
            self._client.will_set(
                will.topic, will.payload, qos=self.settings.qos, retain=will.retain
            )

    # -- configuration (before start) --------------------------------------------------
    def route(self, topic_filter: str, handler: Handler, *, admit: Admit | None = None) -> None:
        """Subscribe to ``topic_filter`` (on every connect) and pass its messages to ``handler``.

        ``handler(topic, payload)`` runs on the dispatcher thread; exceptions are logged
        and counted. ``admit(topic)``, when given, runs on the network thread before a
        message is queued: False drops it (acknowledged, counted), so a flood on one
        topic cannot fill the inbox that every route shares.
        """
        self._filters.append(topic_filter)

        def enqueue(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            self.counters.received += 1
            size = len(msg.payload)
            if size == 0:
                self.counters.empty += 1
                if msg.qos > 0:
                    self._client.ack(msg.mid, msg.qos)
                return
            if size > self.settings.max_payload_bytes:
                self.counters.oversized += 1
                log.warning(
                    "%s: dropped a %d-byte message on %s (limit %d)",
                    self.client_id,
                    size,
                    msg.topic,
                    self.settings.max_payload_bytes,
                )
                if msg.qos > 0:
                    self._client.ack(msg.mid, msg.qos)
                return
            if admit is not None and not admit(msg.topic):
                self.counters.refused_admission += 1
                if msg.qos > 0:
                    self._client.ack(msg.mid, msg.qos)
                return
            self.counters.bytes_received += size
            self._hold((handler, msg.topic, bytes(msg.payload), msg.mid, msg.qos))

        self._client.message_callback_add(topic_filter, enqueue)
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=self.settings.qos)

    def _hold(self, item: tuple[Handler, str, bytes, int, int]) -> None:
        """Queue a received message for the dispatcher, waiting (on the network thread)
        while the inbox is full; a client that stops meanwhile drops it, unacknowledged."""
        try:
            self._inbox.put_nowait(item)
            return
        except queue.Full:
            self.counters.inbox_waits += 1
        while not self._stopping.is_set():
            self._room.clear()
            self._held = True
            try:
                self._inbox.put_nowait(item)
                self._held = False
                return
            except queue.Full:
                self._room.wait(0.25)  # set by the dispatcher at the low-water mark
        self._held = False
        self.counters.dropped += 1  # not acknowledged: delivered again to the next session

    def on_connected(self, hook: Hook) -> None:
        """Run ``hook`` after every successful (re)connect, on the network thread."""
        self._connect_hooks.append(hook)

    def on_publish_denied(self, hook: DenialHook) -> None:
        """Run ``hook(topic, reason)`` on the network thread when the broker refuses a
        publish (MQTT 5 only)."""
        self._denial_hooks.append(hook)

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
            self._ssl_context = tls_context(s.tls)
            c.tls_set_context(self._ssl_context)
            c.tls_insecure_set(s.tls.insecure)
        c.reconnect_delay_set(s.reconnect_min_s, s.reconnect_min_s)
        self._worker = threading.Thread(
            target=self._dispatch, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._worker.start()
        if s.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry_s if self.persistent else 0
            props.MaximumPacketSize = s.max_payload_bytes + 64 * 1024  # topic and framing
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

    @property
    def refused(self) -> str | None:
        """Why the broker refused the latest connection attempt (e.g. not authorised), or
        None while it has not refused one since the last success."""
        return self.last_connect_error if self._refused.is_set() else None

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

    def reserve_outbox(self, messages: int) -> int:
        """Let at least ``messages`` wait in the outbox (never fewer than the settings'
        ``outbox_size``), for a burst the caller is about to publish, e.g. a round's tasks
        and their models for thousands of agents; the outbox's size now."""
        with self._pub_lock:
            self._outbox_size = max(self._outbox_size, messages)
            return self._outbox_size

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Queue a message (QoS from settings). False if the outbox is full (counted).

        While disconnected, QoS > 0 messages wait in the outbox and go out on reconnect.
        """
        if self.settings.qos > 0:
            with self._pub_lock:
                full = len(self._pub_topics) >= self._outbox_size
            if full:
                self.counters.publish_refused += 1
                log.warning("%s: outbox full, refused a message on %s", self.client_id, topic)
                return False
        info = self._client.publish(topic, payload, qos=self.settings.qos, retain=retain)
        self.counters.bytes_sent += len(payload)
        if self.settings.qos > 0:
            self._track(info.mid, topic)
        return info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)

    def publish_confirmed(
        self, topic: str, payload: bytes, timeout: float, *, retain: bool = False
    ) -> ReasonCode | None:
        """Publish at QoS 1 and wait for the broker's PUBACK: its reason code (a failure when
        an MQTT 5 broker refuses the message), or None if none came within ``timeout`` s."""
        done = threading.Event()
        box: list[ReasonCode] = []
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        self._track(info.mid, topic, (done, box))
        done.wait(timeout)
        with self._pub_lock:
            self._confirm.pop(info.mid, None)
        return box[0] if box else None

    def _track(
        self,
        mid: int,
        topic: str,
        waiter: tuple[threading.Event, list[ReasonCode]] | None = None,
    ) -> None:
        """Remember which topic ``mid`` went to until its PUBACK; handle one already here."""
        cap = self._outbox_size + self.settings.max_inflight
        with self._pub_lock:
            early = self._early.pop(mid, None)
            if early is None:
                self._pub_topics[mid] = topic
                if waiter is not None:
                    self._confirm[mid] = waiter
                while len(self._pub_topics) > cap:
                    self._pub_topics.popitem(last=False)  # lost with a dropped session
        if early is not None:
            self._puback(topic, early, waiter)

    # -- paho callbacks (network thread): thin ----------------------------------------------
    def _on_publish(
        self, _c: mqtt.Client, _u: Any, mid: int, reason_code: ReasonCode, _props: Any
    ) -> None:
        with self._pub_lock:
            topic = self._pub_topics.pop(mid, None)
            waiter = self._confirm.pop(mid, None)
            if topic is None:  # publish() has not recorded it yet
                self._early[mid] = reason_code
                while len(self._early) > self.settings.max_inflight + 16:
                    self._early.popitem(last=False)  # QoS 0 messages are never tracked
                return
        self._puback(topic, reason_code, waiter)

    def _puback(
        self,
        topic: str,
        reason_code: ReasonCode,
        waiter: tuple[threading.Event, list[ReasonCode]] | None,
    ) -> None:
        if waiter is not None:
            waiter[1].append(reason_code)
            waiter[0].set()
        if not reason_code.is_failure:
            return
        self.counters.publish_denied += 1
        self.last_publish_denial = (topic, str(reason_code))
        log.warning(
            "%s: the broker refused a message on %s: %s", self.client_id, topic, reason_code
        )
        for hook in self._denial_hooks:
            try:
                hook(topic, str(reason_code))
            except Exception:
                log.exception("%s: publish-denied hook failed", self.client_id)

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
        self.last_connect_error = None
        self._refused.clear()
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
        reason = "connection failed"
        if self._ssl_context is not None:
            reason = tls_diagnosis(self.settings, self._ssl_context) or reason
            level = logging.WARNING if reason != self.last_connect_error else logging.DEBUG
            log.log(level, "%s: %s", self.client_id, reason)
        self.last_connect_error = reason
        self._arm_will()
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
        self._arm_will()
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
            if self._held and self._inbox.qsize() <= self._low_water:
                self._room.set()
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
