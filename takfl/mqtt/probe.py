"""Ask a broker whether it speaks MQTT 5, before a client commits to a protocol version.

A 3.1.1-only broker (the embedded amqtt one) answers an MQTT 5 CONNECT with "Unsupported
protocol version", but only when the CONNECT carries no will and no properties: otherwise it
drops the connection without any answer. So a client that wants MQTT 5 where it can have it,
and has a will and a session expiry, asks first with this bare probe. The probe is anonymous,
under its own random client id, with a clean session: it never touches a client's session
(Mosquitto would force the client id to the user name). Any MQTT 5 CONNACK, a refusal of the
anonymous probe included, shows that the broker speaks MQTT 5.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from takfl.mqtt.client import MqttSettings, tls_context, tls_diagnosis

log = logging.getLogger(__name__)


def connack_reason(settings: MqttSettings, timeout: float) -> str | None:
    """Connect once anonymously with MQTT 5 and disconnect: the broker's CONNACK reason
    ("Success", "Not authorized", "Unsupported protocol version", ...), or None when it did
    not answer within ``timeout`` s."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"takfl-probe-{secrets.token_hex(6)}",
        protocol=mqtt.MQTTv5,
    )
    if settings.tls is not None:
        client.tls_set(
            ca_certs=settings.tls.ca_file,
            certfile=settings.tls.cert_file,
            keyfile=settings.tls.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(settings.tls.insecure)
    answers: list[str] = []
    answered = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        answers.append(str(reason))
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(settings.host, settings.port, settings.keepalive_s, clean_start=True)
    except ssl.SSLError:
        if settings.tls is not None:  # say why, as the client itself does
            reason = tls_diagnosis(settings, tls_context(settings.tls))
            if reason is not None:
                log.warning(reason)
        return None
    except OSError:
        return None
    client.loop_start()
    try:
        answered.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return answers[0] if answers else None
