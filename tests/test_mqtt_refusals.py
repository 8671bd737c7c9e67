"""Bad updates are refused, each with its own reason, while the coordinator keeps
serving: good updates from the same and from another agent are accepted after them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from coordinator.transport.base import Task
from coordinator.transport.mqtt import MqttTransport
from edge_agent.link import AgentLink, ReceivedTask
from takfl.config.base import ModelSpec
from takfl.wire.chunking import split
from takfl.wire.messages import BlobRef, Chunk, UpdateHeader, encode_chunk, encode_message
from takfl.wire.signing import generate_secret, sign
from takfl.wire.topics import Up
from takfl.wire.update import PreparedUpdate, prepare_update, signed_update_header
from takfl.wire.validation import Refusal
from tests.brokers import (
    BROKER_KINDS,
    agent_link,
    coordinator_transport,
    make_registry,
    running_broker,
)

torch.set_num_threads(1)
CHUNK = 512  # small chunks: every blob below has several


def model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(32, 64, generator=g),
        "fc1.bias": torch.zeros(32),
        "bn.num_batches_tracked": torch.tensor(3, dtype=torch.int64),
    }


def trained_from(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1
        for k, v in base.items()
    }


def send_raw(link: AgentLink, header: UpdateHeader, chunks: list[Chunk]) -> None:
    """Publish a header and chunks as given, bypassing the link's own bookkeeping."""
    me = link.identity.agent_id
    link.client.publish(link.topics.up(me, Up.UPDATE), encode_message(header))
    for c in chunks:
        link.client.publish(link.topics.up(me, Up.CHUNK), encode_chunk(c))


def prepared(task: ReceivedTask, link: AgentLink, seed: int) -> PreparedUpdate:
    return prepare_update(
        task.message,
        trained_from(task.global_state, seed),
        task.global_state,
        secret=link.identity.secret,
        num_samples=5,
        chunk_size=CHUNK,
    )


def expect_refusal(link: AgentLink, header: UpdateHeader, reason: Refusal) -> None:
    ack = link.wait_ack(header.blob.digest, timeout=15)
    assert ack is not None, f"no answer to the {reason.value} case"
    assert (ack.accepted, ack.reason) == (False, reason.value)


def expect_accepted(transport: MqttTransport, link: AgentLink, up: PreparedUpdate) -> None:
    update = transport.next_update(timeout=15)
    assert update is not None
    assert (update.client_id, update.round_id) == (up.header.agent_id, up.header.round_id)
    ack = link.wait_ack(up.header.blob.digest, timeout=10)
    assert ack is not None and ack.accepted


def start_round(
    transport: MqttTransport, links: list[AgentLink], round_id: int
) -> list[ReceivedTask]:
    state = model_state(round_id)
    transport.send_tasks(
        [
            Task(
                round_id=round_id,
                prototype="S",
                client_id=link.identity.agent_id,
                model=ModelSpec(builder="mlp_digits"),
                global_state=state,
                deadline=time.time() + 120,
            )
            for link in links
        ]
    )
    tasks = [link.next_task(timeout=15) for link in links]
    assert all(t is not None for t in tasks)
    return [t for t in tasks if t is not None]


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_each_bad_update_is_refused_with_its_reason(kind: str, tmp_path: Path) -> None:
    registry = make_registry({"a1": "S", "a2": "S"})
    with (
        running_broker(kind, tmp_path, agents=["a1", "a2"]) as broker,
        coordinator_transport(broker, registry) as transport,
        agent_link(broker, registry["a1"]) as a1,
        agent_link(broker, registry["a2"]) as a2,
    ):
        assert transport.wait_for_agents(["a1", "a2"], timeout=10)
        t1, t2 = start_round(transport, [a1, a2], round_id=1)
        secret = a1.identity.secret

        # a tampered chunk: the assembled blob fails its digest
        up = prepared(t1, a1, seed=1)
        chunks = split(up.blob, CHUNK)
        bad = chunks[1]
        chunks[1] = Chunk(
            digest=bad.digest,
            index=bad.index,
            count=bad.count,
            payload=bytes([bad.payload[0] ^ 0x40]) + bad.payload[1:],
        )
        send_raw(a1, up.header, chunks)
        expect_refusal(a1, up.header, Refusal.DIGEST_MISMATCH)

        # a header signed with another secret
        up = prepared(t1, a1, seed=2)
        forged = sign(up.header, generate_secret())
        send_raw(a1, forged, split(up.blob, CHUNK))
        expect_refusal(a1, forged, Refusal.BAD_SIGNATURE)

        # tensors of the wrong shape, properly signed
        wrong = {
            "fc1.weight": torch.zeros(8, 8),
            "fc1.bias": torch.zeros(32),
            "bn.num_batches_tracked": torch.tensor(1),
        }
        up = prepare_update(
            t1.message,
            {k: v + 1 for k, v in wrong.items()},
            wrong,
            secret=secret,
            num_samples=5,
            chunk_size=CHUNK,
        )
        send_raw(a1, up.header, split(up.blob, CHUNK))
        expect_refusal(a1, up.header, Refusal.SHAPE_MISMATCH)

        # NaN values
        nan_state = trained_from(t1.global_state, 3)
        nan_state["fc1.weight"][0, 0] = float("nan")
        up = prepare_update(
            t1.message,
            nan_state,
            t1.global_state,
            secret=secret,
            num_samples=5,
            chunk_size=CHUNK,
        )
        send_raw(a1, up.header, split(up.blob, CHUNK))
        expect_refusal(a1, up.header, Refusal.NON_FINITE)

        # an update in another compression than its task's (fp16)
        up = prepare_update(
            t1.message,
            trained_from(t1.global_state, 9),
            t1.global_state,
            secret=secret,
            num_samples=5,
            chunk_size=CHUNK,
            compression="fp32",
        )
        send_raw(a1, up.header, split(up.blob, CHUNK))
        expect_refusal(a1, up.header, Refusal.CODEC_MISMATCH)

        # a declared length over the cap (1 GiB for a ~8 KiB model): refused before allocating
        up = prepared(t1, a1, seed=4)
        huge = signed_update_header(
            up.header,
            secret,
            blob=BlobRef(digest="ee" * 32, size=1 << 30, chunk_size=1 << 20, count=1 << 10),
        )
        send_raw(a1, huge, [])
        expect_refusal(a1, huge, Refusal.TOO_LARGE)

        # an update for a prototype the agent does not belong to
        up = prepared(t1, a1, seed=5)
        other = signed_update_header(up.header, secret, prototype="M")
        send_raw(a1, other, split(up.blob, CHUNK))
        expect_refusal(a1, other, Refusal.WRONG_PROTOTYPE)

        # the coordinator still serves: a good update from a2, then one from a1
        good2 = prepared(t2, a2, seed=6)
        a2.send_prepared(good2, deadline=t2.message.deadline)
        expect_accepted(transport, a2, good2)
        good1 = prepared(t1, a1, seed=7)
        a1.send_prepared(good1, deadline=t1.message.deadline)
        expect_accepted(transport, a1, good1)

        # next round: a1 sends its accepted round-1 update again
        _, r2_a2 = start_round(transport, [a1, a2], round_id=2)
        a1.send_prepared(good1, deadline=t1.message.deadline)
        expect_refusal(a1, good1.header, Refusal.STALE_ROUND)
        good2 = prepared(r2_a2, a2, seed=8)
        a2.send_prepared(good2, deadline=r2_a2.message.deadline)
        expect_accepted(transport, a2, good2)

        assert transport.counters.accepted == 3
        assert dict(transport.counters.refused) == {
            r.value: 1
            for r in (
                Refusal.DIGEST_MISMATCH,
                Refusal.BAD_SIGNATURE,
                Refusal.SHAPE_MISMATCH,
                Refusal.NON_FINITE,
                Refusal.CODEC_MISMATCH,
                Refusal.TOO_LARGE,
                Refusal.WRONG_PROTOTYPE,
                Refusal.STALE_ROUND,
            )
        }
        assert transport.next_update(timeout=0.5) is None
