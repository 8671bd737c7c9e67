"""MQTT client layer shared by the coordinator and the agents (paho-mqtt 2.x).

``client``: the connection (persistent session, QoS 1, routing, bounded inbox,
reconnect with backoff and jitter); ``blobs``: chunked blob transfer with
requests for missing chunks. The agent's end of the protocol lives in
``edge_agent.link``; the coordinator's in ``coordinator.transport.mqtt``.
paho-mqtt is imported here only: install the ``agent`` or ``coordinator`` extra.
"""

from takfl.mqtt.blobs import BlobReceiver, BlobSender, BlobStore
from takfl.mqtt.client import MqttClient, MqttConnectError, MqttSettings, TlsSettings, Will

__all__ = [
    "BlobReceiver",
    "BlobSender",
    "BlobStore",
    "MqttClient",
    "MqttConnectError",
    "MqttSettings",
    "TlsSettings",
    "Will",
]
