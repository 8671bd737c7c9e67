"""Runs, freshness and versions at the agent's end, without a broker: the agent follows
the coordinator's run and never acts on an older run's task, refuses stale and replayed
messages, reads the refusal of its version from a coordinator of another major, and
registers once per (its connection, the coordinator's connection)."""

from __future__ import annotations

import json
import time

import torch

from edge_agent.inbound import InboundReader
from edge_agent.intake import TaskIntake
from edge_agent.presence import RegistrationBook, RunFilter, coordinator_presence
from takfl.wire.canonical import canonical_bytes
from takfl.wire.chunking import blob_ref
from takfl.wire.codec import encode_state
from takfl.wire.envelope import new_run_id, signed_part
from takfl.wire.messages import Ack, ModelRef, Registration, Status, TaskMessage, encode_message
from takfl.wire.signing import generate_secret, hmac_hex, message_ref, restamp, sign
from takfl.wire.validation import Refusal

SECRET = generate_secret()
BLOB = encode_state({"w": torch.ones(4, 4)}, "fp32")


def task(run: str, round_id: int, sent_at: float) -> TaskMessage:
    msg = TaskMessage(
        run=run,
        sent_at=sent_at,
        round_id=round_id,
        agent_id="a1",
        prototype="S",
        model=ModelRef(builder="mlp_digits"),
        num_classes=10,
        input_shape=(1, 8, 8),
        seed=7,
        deadline=time.time() + 60,
        compression="fp16",
        chunk_size=256,
        blob=blob_ref(BLOB, 256),
    )
    return sign(msg, SECRET)


def test_the_agent_follows_the_newest_run_and_ignores_an_older_runs_tasks() -> None:
    # Prepare: run A's task, then run B's (a new coordinator start), then one of run A
    # sent before B began, delivered late (a persistent session)
    reader, intake = InboundReader("a1", SECRET, "S"), TaskIntake("a1")
    now = time.time()
    run_a, run_b = new_run_id(), new_run_id()
    # Execute
    first = intake.task(reader.task(encode_message(task(run_a, 1, now - 20))))
    second = intake.task(reader.task(encode_message(task(run_b, 1, now - 10))))
    late = intake.task(reader.task(encode_message(task(run_a, 2, now - 15))))
    # Assert
    assert [a.run for a in first.acks] == [run_a] and [a.run for a in second.acks] == [run_b]
    assert late.acks == () and intake.run == run_b
    assert intake.counters.refused["other_run"] == 1 and intake.counters.runs == 2


def test_stale_and_replayed_messages_are_not_acted_on() -> None:
    reader = InboundReader("a1", SECRET, "S")
    stale = reader.task(encode_message(task("", 1, time.time() - 3600)))
    assert stale.verdict.reason is Refusal.STALE_MESSAGE and stale.message is None
    ack = sign(Ack(subject="update", agent_id="a1", digest="ab" * 32, accepted=True), SECRET)
    assert reader.control(Ack, encode_message(ack), "ack") is not None
    assert reader.control(Ack, encode_message(ack), "ack") is None  # the same nonce again
    assert reader.control(Ack, encode_message(restamp(ack, SECRET)), "ack") is not None
    assert reader.stale == 1 and reader.unauthenticated == 0


def test_the_refusal_of_this_agents_version_is_read_from_another_major() -> None:
    # Prepare: this agent registered; a coordinator of protocol 2.3 refuses it in the
    # frozen form (protocol 1.0's ack fields)
    reg = sign(
        Registration(
            agent_id="a1", prototype="S", profile="p", hardware_class="phone", num_samples=1
        ),
        SECRET,
    )
    refusal = json.loads(
        encode_message(
            Ack(
                subject="register",
                agent_id="a1",
                digest=message_ref(reg),
                accepted=False,
                reason="unsupported_version",
                detail="this coordinator speaks protocol 2.3",
            )
        )
    ) | {"protocol": "2.3"}
    refusal["signature"] = hmac_hex(SECRET, signed_part(refusal))
    other = {**refusal, "reason": "too_large"}
    other["signature"] = hmac_hex(SECRET, signed_part(other))
    reader = InboundReader("a1", SECRET, "S")
    # Execute
    read = reader.control(Ack, canonical_bytes(refusal), "ack")
    unread = reader.control(Ack, canonical_bytes(other), "ack")
    # Assert: only the version refusal crosses majors
    assert read is not None and read.reason == "unsupported_version" and "2.3" in read.detail
    assert read.digest == message_ref(reg) and unread is None


def test_an_agent_registers_once_per_coordinator_connection() -> None:
    book = RegistrationBook()
    book.connected()
    assert book.coordinator("online", 10.0)  # the retained status, on subscribing
    assert not book.coordinator("online", 10.0)  # the same connection again
    assert not book.coordinator("offline", 10.0)  # it would not hear it
    assert book.coordinator("online", 20.0)  # the coordinator reconnected
    book.connected()  # this agent reconnected: register with whoever is online
    assert book.coordinator("online", 20.0)


def test_the_coordinators_presence_is_read_in_any_major_version() -> None:
    status = Status(agent_id="coordinator", state="online", time=12.5)
    other = json.loads(encode_message(status)) | {"protocol": "3.2", "new": 1}
    assert coordinator_presence(encode_message(status)) == ("online", 12.5)
    assert coordinator_presence(canonical_bytes(other)) == ("online", 12.5)
    assert coordinator_presence(b"{}") is None


def test_acks_and_requests_of_another_run_are_counted_and_ignored() -> None:
    runs = RunFilter("a1")
    assert runs.accepts("update ack", "r1", "r1") and runs.accepts("chunk request", "x", None)
    assert not runs.accepts("update ack", "r2", "r1") and runs.ignored == 1
