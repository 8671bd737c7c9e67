"""The zero-setup broker: amqtt on loopback, in a background thread with its own loop.

Anonymous clients are allowed, so it binds to a loopback address only. It is
for demos and tests; production uses Mosquitto (``coordinator.broker.mosquitto``).
amqtt keeps no state across restarts and drops the sessions of anonymous
clients when they disconnect: the protocol recovers through chunk requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from coordinator.broker.errors import BrokerStartError
from coordinator.broker.net import LOOPBACK, free_port, is_loopback

log = logging.getLogger(__name__)

ANONYMOUS_PLUGIN = "amqtt.plugins.authentication.AnonymousAuthPlugin"


def _tracking_broker_class() -> type[Any]:
    """An amqtt ``Broker`` that remembers its client streams, refuses connections once
    stopping, and can close every stream: clients reconnecting while the broker shuts
    down must neither keep it from stopping nor keep a half-dead connection."""
    from amqtt.broker import Broker

    class TrackingBroker(Broker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.streams: set[asyncio.StreamWriter] = set()
            self.stopping = False

        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            if self.stopping:
                writer.close()
                return
            self.streams.add(writer)
            try:
                await super().stream_connected(reader, writer, listener_name)
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


def broker_config(host: str, port: int, max_connections: int = 0) -> dict[str, Any]:
    """amqtt configuration: one TCP listener on ``host:port``, anonymous access, no extras."""
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": max_connections}
        },
        "plugins": {ANONYMOUS_PLUGIN: {"allow_anonymous": True}},
    }


class EmbeddedBroker:
    """``with EmbeddedBroker() as b: ... b.host, b.port ...`` (or start()/stop())."""

    def __init__(
        self, port: int | None = None, *, host: str = LOOPBACK, max_connections: int = 0
    ) -> None:
        if not is_loopback(host):
            raise ValueError(
                f"the embedded broker allows anonymous clients: bind it to a "
                f"loopback address, not {host!r} (use Mosquitto beyond this host)"
            )
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.max_connections = max_connections
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
        broker = _tracking_broker_class()(broker_config(self.host, self.port, self.max_connections))
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
