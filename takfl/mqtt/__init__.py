"""MQTT client layer shared by the coordinator and the agents (paho-mqtt 2.x).

``client``: the connection (persistent session, QoS 1, routing, bounded inbox,
reconnect with backoff and jitter); ``blobs``: chunked blob transfer with
requests for missing chunks; ``agent``: the agent's end of the protocol.
paho-mqtt is imported here only: install the ``agent`` or ``coordinator`` extra.
"""

from takfl.mqtt.agent import AgentIdentity, AgentLink, LinkPolicy, ReceivedTask
from takfl.mqtt.blobs import BlobReceiver, BlobSender, BlobStore
from takfl.mqtt.client import MqttClient, MqttConnectError, MqttSettings, TlsSettings, Will

__all__ = [
    "AgentIdentity",
    "AgentLink",
    "BlobReceiver",
    "BlobSender",
    "BlobStore",
    "LinkPolicy",
    "MqttClient",
    "MqttConnectError",
    "MqttSettings",
    "ReceivedTask",
    "TlsSettings",
    "Will",
]
