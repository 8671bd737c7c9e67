"""The zero-setup broker: amqtt on loopback, in a background thread with its own loop.

It enforces the same rules as the generated Mosquitto configuration
(:mod:`coordinator.broker.acl`): a client must log in with a provisioned username and
password (agents with their agent id as client id), and may publish, subscribe and
receive only on the topics its user is granted. A packet larger than
``max_packet_bytes`` is refused before it is read: the connection is closed, as
Mosquitto's ``max_packet_size`` does. It binds to a loopback address only: it is for
demos, tests and single-host runs; production uses Mosquitto
(``coordinator.broker.mosquitto``). amqtt keeps no state across restarts: the protocol
recovers through chunk requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from coordinator.broker.acl import BrokerAccess
from coordinator.broker.embedded_plugins import AUTH_PLUGIN, TOPIC_PLUGIN, plugin_configs
from coordinator.broker.errors import BrokerStartError
from coordinator.broker.net import LOOPBACK, free_port, is_loopback
from takfl.wire.messages import MAX_PACKET_BYTES

log = logging.getLogger(__name__)


def _tracking_broker_class() -> type[Any]:
    """An amqtt ``Broker`` that remembers its client streams, refuses connections once
    stopping, can close every stream (clients reconnecting while the broker shuts down
    must neither keep it from stopping nor keep a half-dead connection), and refuses
    packets over its size limit before reading them."""
    from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
    from amqtt.broker import Broker

    class LimitedReader(StreamReaderAdapter):
        def __init__(self, reader: asyncio.StreamReader, limit: int, peer: str) -> None:
            super().__init__(reader)
            self.limit = limit
            self.peer = peer

        async def read(self, n: int = -1) -> bytes:
            if n > self.limit:
                log.warning(
                    "embedded broker: %s sent a %d-byte packet (limit %d); disconnected",
                    self.peer,
                    n,
                    self.limit,
                )
                raise ConnectionResetError("packet over the size limit")
            return await super().read(n)

    class TrackingBroker(Broker):
        def __init__(self, *args: Any, max_packet_bytes: int, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.streams: set[asyncio.StreamWriter] = set()
            self.stopping = False
            self.max_packet_bytes = max_packet_bytes

        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            if self.stopping:
                writer.close()
                return
            self.streams.add(writer)
            peer = str(writer.get_extra_info("peername"))
            try:
                await self._client_connected(
                    listener_name,
                    LimitedReader(reader, self.max_packet_bytes, peer),
                    StreamWriterAdapter(writer),
                )
            finally:
                self.streams.discard(writer)

        def close_streams(self) -> None:
            for writer in list(self.streams):
                writer.transport.abort()
            self.streams.clear()

    return TrackingBroker


async def _shutdown(broker: Any, timeout: float) -> None:
    """Stop listening, drop every client connection, then amqtt's own shutdown (bounded).

    Connections are dropped first: amqtt's shutdown can wait forever on a client's
    reader that does not notice the cancellation.
    """
    broker.stopping = True
    for server in getattr(broker, "_servers", {}).values():
        instance = getattr(server, "instance", None)
        if instance is not None:
            instance.close()
    broker.close_streams()
    await asyncio.sleep(0.05)  # let the readers see the closed connections
    try:
        await asyncio.wait_for(broker.shutdown(), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        log.warning("embedded broker shutdown timed out")


def broker_config(
    host: str, port: int, access: BrokerAccess, max_connections: int = 0
) -> dict[str, Any]:
    """amqtt configuration: one TCP listener on ``host:port``, logins and topic rules
    from ``access``, no other plugins."""
    auth, topics = plugin_configs(access)
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": max_connections}
        },
        "plugins": {AUTH_PLUGIN: auth, TOPIC_PLUGIN: topics},
    }


class EmbeddedBroker:
    """``with EmbeddedBroker(access=...) as b: ... b.host, b.port ...`` (or start()/stop())."""

    def __init__(
        self,
        port: int | None = None,
        *,
        access: BrokerAccess,
        host: str = LOOPBACK,
        max_connections: int = 0,
        max_packet_bytes: int = MAX_PACKET_BYTES,
    ) -> None:
        if not is_loopback(host):
            raise ValueError(
                f"the embedded broker is for one host: bind it to a loopback address, "
                f"not {host!r} (use Mosquitto with TLS beyond this host)"
            )
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.access = access
        self.max_connections = max_connections
        self.max_packet_bytes = max_packet_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def running(self) -> bool:
        return self._broker is not None

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start listening; raises :class:`BrokerStartError` if the port cannot be bound."""
        if self.running:
            return self
        started: Future[Any] = Future()
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                broker = loop.run_until_complete(self._start_broker())
            except BaseException as e:  # reported to the starting thread
                started.set_exception(e)
                loop.close()
                return
            started.set_result(broker)
            loop.run_forever()
            self._finish(loop)

        self._thread = threading.Thread(target=run, name=f"amqtt-{self.port}", daemon=True)
        self._thread.start()
        try:
            self._broker = started.result(timeout)
        except Exception as e:
            self._thread.join(timeout)
            self._thread = None
            raise BrokerStartError(
                f"embedded broker could not listen on {self.host}:{self.port} ({e}); "
                "pick another port or stop what holds it"
            ) from e
        self._loop = loop
        log.info("embedded MQTT broker on %s:%d", self.host, self.port)
        return self

    async def _start_broker(self) -> Any:
        config = broker_config(self.host, self.port, self.access, self.max_connections)
        broker = _tracking_broker_class()(config, max_packet_bytes=self.max_packet_bytes)
        await broker.start()
        return broker

    @staticmethod
    def _finish(loop: asyncio.AbstractEventLoop) -> None:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every client connection and the listener; idempotent."""
        loop, broker, thread = self._loop, self._broker, self._thread
        self._loop = self._broker = self._thread = None
        if loop is None or broker is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(_shutdown(broker, timeout / 2), loop).result(timeout)
        except Exception:
            log.exception("embedded broker did not shut down cleanly")
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
