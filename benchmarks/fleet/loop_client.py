"""Many MQTT connections served by one thread: the light agents' client.

:class:`MqttClient` gives every connection two threads (paho's network loop and a
dispatcher); a worker that serves a thousand agents would run two thousand threads.
Here one :class:`SharedLoop` drives every connection of a worker through paho's
external-loop interface (``loop_read``/``loop_write``/``loop_misc`` on a selector), and
:class:`LoopClient` offers :class:`AgentLink` the surface it uses of ``MqttClient``
(routes, connect and tick hooks, a signed will armed per connection, publish, counters).
Handlers run on the loop thread as messages arrive (paho acknowledges QoS 1 after the
callback returns), so what an agent does is exactly what ``AgentLink`` does; only the
threads are shared. No reconnects: a lost connection is counted, and the benchmark
reports it.
"""

from __future__ import annotations

import contextlib
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from takfl.mqtt.client import ClientCounters, Handler, Hook, MqttSettings, Will

AfterMessage = Callable[["LoopClient"], None]


class SharedLoop:
    """One selector and one thread for many :class:`LoopClient` connections."""

    def __init__(self, tick_s: float = 1.0) -> None:
        self.tick_s = tick_s
        self.clients: list[LoopClient] = []
        self.selector = selectors.DefaultSelector()
        self.after_message: AfterMessage | None = None  # called after each handled message
        self._calls: list[Callable[[], None]] = []  # run on the loop thread
        self._calls_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread at its next turn."""
        with self._calls_lock:
            self._calls.append(fn)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shared-mqtt-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def watch(self, client: LoopClient, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)
        self.selector.register(sock, selectors.EVENT_READ, client)

    def want_write(self, client: LoopClient, sock: Any, on: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.modify(sock, events, client)

    def forget(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(sock)

    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick_s
        while not self._stop.is_set():
            with self._calls_lock:
                calls, self._calls = self._calls, []
            for fn in calls:
                fn()
            timeout = max(0.0, min(0.05, next_tick - time.monotonic()))
            events = self.selector.select(timeout) if self.selector.get_map() else []
            if not events:
                time.sleep(timeout if not self.selector.get_map() else 0)
            for key, mask in events:
                client: LoopClient = key.data
                if mask & selectors.EVENT_READ:
                    client.paho.loop_read()
                if mask & selectors.EVENT_WRITE:
                    client.paho.loop_write()
            if time.monotonic() >= next_tick:
                for c in self.clients:
                    c.tick()
                next_tick = time.monotonic() + self.tick_s


class LoopClient:
    """The part of :class:`takfl.mqtt.client.MqttClient` an ``AgentLink`` uses, on a
    :class:`SharedLoop`. Routes are exact topics (an agent's are)."""

    def __init__(
        self,
        loop: SharedLoop,
        settings: MqttSettings,
        client_id: str,
        *,
        will: Will | Callable[[float], Will] | None = None,
    ) -> None:
        self.loop = loop
        self.settings = settings
        self.client_id = client_id
        self.counters = ClientCounters()
        self.connection_time = 0.0
        self.owner: Any = None  # what the worker serves through this client
        self._will = will
        self._routes: dict[str, Handler] = {}
        self._connect_hooks: list[Hook] = []
        self._tick_hooks: list[Hook] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        p = self.paho
        p.on_connect = self._on_connect
        p.on_disconnect = self._on_disconnect
        p.on_subscribe = self._on_subscribe
        p.on_message = self._on_message
        p.on_socket_open = lambda _c, _u, sock: loop.watch(self, sock)
        p.on_socket_close = lambda _c, _u, sock: loop.forget(sock)
        p.on_socket_register_write = lambda _c, _u, sock: loop.want_write(self, sock, True)
        p.on_socket_unregister_write = lambda _c, _u, sock: loop.want_write(self, sock, False)
        p.max_inflight_messages_set(settings.max_inflight)
        p.max_queued_messages_set(settings.outbox_size)
        loop.clients.append(self)

    # -- configuration ---------------------------------------------------------------------
    def route(self, topic_filter: str, handler: Handler, **_: Any) -> None:
        if "+" in topic_filter or "#" in topic_filter:
            raise ValueError(f"LoopClient routes exact topics, got {topic_filter!r}")
        self._routes[topic_filter] = handler

    def on_connected(self, hook: Hook) -> None:
        self._connect_hooks.append(hook)

    def every_tick(self, hook: Hook) -> None:
        self._tick_hooks.append(hook)

    # -- lifecycle (call on the loop thread, or before the loop starts) ----------------------
    def start(self, timeout: float | None = None) -> None:
        """Connect (the CONNECT goes out; the loop reads the answer)."""
        s = self.settings
        self.connection_time = time.time()
        will = self._will(self.connection_time) if callable(self._will) else self._will
        if will is not None:
            self.paho.will_set(will.topic, will.payload, qos=s.qos, retain=will.retain)
        if s.username is not None:
            self.paho.username_pw_set(s.username, s.password)
        self.paho.connect(s.host, s.port, s.keepalive_s)

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (retained) and disconnect; on the loop thread."""
        if final is not None and self._connected.is_set():
            self.paho.publish(final[0], final[1], qos=self.settings.qos, retain=True)
        self._connected.clear()
        self.paho.disconnect()

    # -- use ----------------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        info = self.paho.publish(topic, payload, qos=self.settings.qos, retain=retain)
        self.counters.bytes_sent += len(payload)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.counters.publish_refused += 1
            return False
        return True

    def tick(self) -> None:
        if self._connected.is_set():
            self.paho.loop_misc()  # keepalive
            for hook in self._tick_hooks:
                hook()

    # -- paho callbacks (loop thread) ----------------------------------------------------------
    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        self.counters.connects += 1
        self._connected.set()
        _, self._sub_mid = c.subscribe([(t, int(self.settings.qos)) for t in self._routes])
        for hook in self._connect_hooks:
            hook()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, _codes: Any, _p: Any) -> None:
        if mid == self._sub_mid:
            self._subscribed.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        if self._connected.is_set():
            self.counters.disconnects += 1
        self._connected.clear()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.counters.received += 1
        payload = bytes(msg.payload)
        handler = self._routes.get(msg.topic)
        if handler is None or not payload:
            self.counters.unrouted += int(handler is None)
            return
        self.counters.bytes_received += len(payload)
        try:
            handler(msg.topic, payload)
        except Exception:
            self.counters.handler_errors += 1
        if self.loop.after_message is not None:
            self.loop.after_message(self)
