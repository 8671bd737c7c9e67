"""MQTT brokers for the coordinator: an embedded amqtt broker (loopback, zero setup)
and Mosquitto provisioning (config, password file, ACL) plus a process runner."""

from coordinator.broker.embedded import EmbeddedBroker
from coordinator.broker.errors import BrokerStartError
from coordinator.broker.mosquitto import (
    MosquittoFiles,
    MosquittoProcess,
    MosquittoTls,
    find_mosquitto,
    write_mosquitto_config,
)
from coordinator.broker.net import LOOPBACK, free_port

__all__ = [
    "LOOPBACK",
    "BrokerStartError",
    "EmbeddedBroker",
    "MosquittoFiles",
    "MosquittoProcess",
    "MosquittoTls",
    "find_mosquitto",
    "free_port",
    "write_mosquitto_config",
]
