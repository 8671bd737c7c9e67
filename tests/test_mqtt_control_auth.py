"""Control messages that agents and the coordinator act on are authenticated, and chunk
re-sends are rate-limited, on Mosquitto and on the embedded broker.

The forger publishes, through a connection the ACL lets write on the agent's topics
(what any process gets on a broker without an ACL), unsigned or wrongly signed acks,
statuses and chunk requests. The agent and the coordinator must ignore them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from coordinator.transport.base import Task
from coordinator.transport.mqtt import MqttTransport
from edge_agent.link import REGISTER_KEY, AgentLink
from takfl.config.base import ModelSpec
from takfl.wire.messages import Ack, ChunkRequest, Status, encode_message
from takfl.wire.signing import generate_secret, sign
from takfl.wire.topics import Down, Topics, Up
from takfl.wire.update import prepare_update
from tests.brokers import (
    BROKER_KINDS,
    agent_link,
    coordinator_transport,
    make_registry,
    running_broker,
)

torch.set_num_threads(1)
REQUESTS = 100  # forged or genuine chunk requests per attack
# Bytes re-sent per byte of request may not exceed this: each agent may have each blob
# re-sent at most ResendLimits.blob_copies (2) times per minute; without a limit, 100
# requests for a 1 MiB blob make ~6,000x.
AMPLIFICATION_BOUND = 100.0


def model_state(seed: int) -> dict[str, torch.Tensor]:
    """About 1 MiB (8 chunks of 128 KiB) in fp32."""
    g = torch.Generator().manual_seed(seed)
    return {"enc.weight": torch.randn(512, 512, generator=g), "enc.bias": torch.zeros(512)}


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def start_task(transport: MqttTransport, link: AgentLink, round_id: int = 1) -> None:
    transport.send_tasks(
        [
            Task(
                round_id=round_id,
                prototype="S",
                client_id=link.identity.agent_id,
                model=ModelSpec(builder="mlp_digits"),
                global_state=model_state(round_id),
                deadline=time.time() + 120,
            )
        ]
    )


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_forged_acks_statuses_and_requests_are_ignored(kind: str, tmp_path: Path) -> None:
    registry = make_registry({"a1": "S"})
    t = Topics("test")
    with (
        running_broker(kind, tmp_path, agents=["a1"]) as broker,
        coordinator_transport(broker, registry) as transport,
        agent_link(broker, registry["a1"]) as link,
    ):
        assert transport.wait_for_agents(["a1"], timeout=10)
        genuine = link.wait_ack(REGISTER_KEY, timeout=10)
        assert genuine is not None and genuine.accepted
        # any connection with write access to these topics will do; the coordinator's
        # (Mosquitto forces client id = username, so a second login would take it over)
        bad = transport.client
        refusal = Ack(subject="register", agent_id="a1", accepted=False, reason="unknown_agent")
        wrongly_signed = sign(
            Ack(
                subject="register",
                agent_id="a1",
                digest=genuine.digest,
                accepted=False,
                reason="wrong_prototype",
            ),
            generate_secret(),
        )
        for forged in (refusal, wrongly_signed):
            bad.publish(t.down("a1", Down.ACK), encode_message(forged))
        offline = Status(agent_id="a1", state="offline", time=time.time() + 3600)
        bad.publish(t.up("a1", Up.STATUS), encode_message(offline), retain=True)
        request = ChunkRequest(agent_id="a1", digest="ab" * 32, missing=[0])
        bad.publish(t.down("a1", Down.REQUEST), encode_message(request))
        assert wait_until(lambda: link.counters.unauthenticated >= 3, 10)
        time.sleep(0.5)
        # the agent still holds the genuine acceptance and the coordinator still samples it
        ack = link.wait_ack(REGISTER_KEY, timeout=1)
        assert ack is not None and ack.accepted
        assert transport.clients() == {"S": ["a1"]}
        assert link.counters.requests_answered == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_chunk_request_amplification_is_bounded(kind: str, tmp_path: Path) -> None:
    registry = make_registry({"a1": "S"})
    with (
        running_broker(kind, tmp_path, agents=["a1"]) as broker,
        coordinator_transport(broker, registry) as transport,
        agent_link(broker, registry["a1"]) as link,
    ):
        assert transport.wait_for_agents(["a1"], timeout=10)
        start_task(transport, link)
        task = link.next_task(timeout=30)
        assert task is not None
        blob = task.message.blob
        # a provisioned agent asks, properly signed, for its whole global model 100 times
        me = link.identity.agent_id
        run = task.message.run
        request = sign(
            ChunkRequest(run=run, agent_id=me, digest=blob.digest, missing=list(range(blob.count))),
            link.identity.secret,
        )
        payload = encode_message(request)
        for _ in range(REQUESTS):
            link.client.publish(link.topics.up(me, Up.REQUEST), payload)
        time.sleep(3.0)
        sent = transport.sender.resent_bytes
        asked = REQUESTS * len(payload)
        assert sent > 0  # a genuine request is still answered...
        assert sent <= 2 * (blob.size + blob.count * 64)  # ...up to two copies of the blob
        assert sent / asked < AMPLIFICATION_BOUND

        # the agent's side: a coordinator asks 100 times for the agent's whole update
        up = prepare_update(
            task.message,
            {k: v + 0.01 for k, v in task.global_state.items()},
            task.global_state,
            secret=link.identity.secret,
            num_samples=3,
        )
        link.send_prepared(up, deadline=task.message.deadline)
        assert transport.next_update(timeout=30) is not None
        ask = sign(
            ChunkRequest(
                run=run,
                agent_id=me,
                digest=up.header.blob.digest,
                missing=list(range(up.header.blob.count)),
            ),
            registry[me].secret,
        )
        for _ in range(REQUESTS):
            transport.client.publish(transport.topics.down(me, Down.REQUEST), encode_message(ask))
        assert wait_until(lambda: link.counters.requests_answered >= 1, 10)
        time.sleep(2.0)
        assert link.sender.resent_bytes <= 2 * (up.header.blob.size + up.header.blob.count * 64)
