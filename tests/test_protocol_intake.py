"""Runs, freshness, codecs and chunks at the coordinator's intake and presence, without a
broker: a header of another run is answered ``other_run`` and never acted on, a stale or
replayed one is counted and never answered, one after the run ended is answered
``run_finished``, an update must be in its task's compression, a chunk that does not fit
is refused alone, an agent of another major version is told so."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from coordinator.transport.base import Task
from coordinator.transport.dispatch import TaskDispatch, task_message
from coordinator.transport.inbound import read
from coordinator.transport.intake import Decision, IntakePolicy, UpdateIntake
from coordinator.transport.presence import Presence
from takfl.config.base import ModelSpec
from takfl.config.profile import CommsSpec
from takfl.wire.canonical import canonical_bytes
from takfl.wire.chunking import blob_ref, split
from takfl.wire.codec import encode_state, make_delta
from takfl.wire.envelope import new_run_id, signed_part
from takfl.wire.freshness import ReplayGuard
from takfl.wire.messages import (
    Ack,
    Chunk,
    Registration,
    UpdateHeader,
    encode_chunk,
    encode_message,
)
from takfl.wire.signing import generate_secret, hmac_hex, restamp, sign
from takfl.wire.topics import Topics, Up
from takfl.wire.update import PreparedUpdate, prepare_update, signed_update_header
from takfl.wire.validation import AgentRecord, Refusal, Verdict

TOPICS = Topics("unit")
CHUNK = 256
RUN = new_run_id()


class Fixture:
    """Run ``RUN``, round 1, a task for a1 asking fp16; an intake with a replay guard."""

    def __init__(self) -> None:
        self.secret = generate_secret()
        self.registry = {"a1": AgentRecord(agent_id="a1", prototype="S", secret=self.secret)}
        self.dispatch = TaskDispatch(self.registry, retry_s=60.0, run=RUN)
        self.intake = UpdateIntake(
            self.registry, self.dispatch, IntakePolicy(quiet_s=60.0), guard=ReplayGuard()
        )
        g = torch.Generator().manual_seed(0)
        self.state = {"w": torch.randn(16, 8, generator=g), "b": torch.zeros(16)}
        task = Task(
            round_id=1,
            prototype="S",
            client_id="a1",
            model=ModelSpec(builder="mlp_digits"),
            global_state=self.state,
            deadline=time.time() + 60,
        )
        ref = blob_ref(encode_state(self.state, "fp32"), CHUNK)
        self.task = task_message(
            task,
            ref,
            self.secret,
            comms=CommsSpec(),
            num_classes=10,
            input_shape=(1, 8, 8),
            run=RUN,
        )
        self.dispatch.assign([(task, self.task)])

    def update(self, **kw: object) -> PreparedUpdate:
        trained = {k: v + 0.01 for k, v in self.state.items()}
        return prepare_update(
            self.task,
            trained,
            self.state,
            secret=self.secret,
            num_samples=5,
            chunk_size=CHUNK,
            **kw,  # type: ignore[arg-type]
        )

    def header(self, header: UpdateHeader) -> Decision:
        received = read(
            UpdateHeader,
            TOPICS,
            TOPICS.up("a1", Up.UPDATE),
            encode_message(header),
            self.registry,
            authenticate=False,
        )
        return self.intake.header(received)

    def chunks(self, chunks: list[Chunk]) -> list[Decision]:
        return [self.intake.chunk("a1", encode_chunk(c)) for c in chunks]


def test_an_update_of_another_run_is_answered_and_never_acted_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the previous run's header, delivered by a persistent session
    f = Fixture()
    old = signed_update_header(f.update().header, f.secret, run=new_run_id())
    # Execute
    with caplog.at_level(logging.WARNING):
        first, second = f.header(old), f.header(restamp(old, f.secret))
    # Assert: other_run (not future_round), echoing its run; logged once; nothing pending
    for d in (first, second):
        assert d.ack is not None and d.ack.reason == Refusal.OTHER_RUN.value
        assert d.ack.run == old.run and not d.ack.accepted
    assert f.intake.pending() == 0 and f.intake.counters.refused["other_run"] == 2
    assert sum("another run" in r.message for r in caplog.records) == 1
    assert "future_round" not in caplog.text


def test_stale_and_replayed_headers_are_counted_and_never_answered() -> None:
    f = Fixture()
    up = f.update()
    assert f.header(up.header).verdict.accepted
    replayed = f.header(up.header)  # the same bytes again
    stale = f.header(restamp(up.header, f.secret, now=time.time() - 3600))
    assert (replayed.verdict.reason, replayed.ack) == (Refusal.REPLAYED, None)
    assert (stale.verdict.reason, stale.ack) == (Refusal.STALE_MESSAGE, None)
    assert f.intake.counters.refused["replayed"] == f.intake.counters.refused["stale_message"] == 1


def test_a_header_announced_again_gets_the_same_answer() -> None:
    # an agent re-announces with a fresh stamp: same content, same answer
    f = Fixture()
    up = f.update()
    f.header(up.header)
    accepted = f.chunks(split(up.blob, CHUNK))[-1].ack
    again = f.header(restamp(up.header, f.secret))
    assert accepted is not None and accepted.accepted and again.ack == accepted


def test_after_the_run_finished_every_update_is_answered_run_finished() -> None:
    f = Fixture()
    f.dispatch.finish()
    d = f.header(f.update().header)
    assert d.ack is not None and d.ack.reason == Refusal.RUN_FINISHED.value
    assert f.dispatch.due_retries() == []  # no task is sent again either


def test_an_update_must_be_in_its_tasks_compression() -> None:
    # Prepare: the task asks fp16
    f = Fixture()
    fp32 = f.update(compression="fp32")
    # a header saying fp16 whose blob is fp32
    blob = encode_state(make_delta({k: v + 0.01 for k, v in f.state.items()}, f.state), "fp32")
    lying = signed_update_header(f.update().header, f.secret, blob=blob_ref(blob, CHUNK))
    # Execute
    refused = f.header(fp32.header)
    assert f.header(lying).verdict.accepted
    last = f.chunks(split(blob, CHUNK))[-1]
    # Assert
    assert refused.ack is not None and refused.ack.reason == Refusal.CODEC_MISMATCH.value
    assert last.ack is not None and last.ack.reason == Refusal.CODEC_MISMATCH.value


def test_a_bad_chunk_is_refused_alone_and_the_update_still_completes() -> None:
    # Prepare
    f = Fixture()
    up = f.update()
    f.header(up.header)
    chunks = split(up.blob, CHUNK)
    short = Chunk(digest=chunks[0].digest, index=0, count=chunks[0].count, payload=b"x")
    miscounted = Chunk(digest=chunks[0].digest, index=0, count=99, payload=chunks[0].payload)
    # Execute
    bad = f.chunks([short, miscounted])
    rest = f.chunks(chunks)
    # Assert: no answer to the bad ones, the update accepted once the right chunk came
    assert all(d.ack is None for d in bad) and f.intake.counters.bad_chunks == 2
    assert rest[-1].update is not None and rest[-1].ack is not None and rest[-1].ack.accepted


def test_chunks_of_an_unannounced_digest_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    f = Fixture()
    chunks = split(b"nobody announced this" * 50, CHUNK)
    with caplog.at_level(logging.INFO):
        assert all(d.ack is None for d in f.chunks(chunks + chunks))
    assert f.intake.counters.ignored_chunks == 2 * len(chunks)
    assert sum("no update announced it" in r.message for r in caplog.records) == 1


# -- registrations -------------------------------------------------------------------------------
def registration(secret: bytes, **changes: object) -> Registration:
    reg = Registration(
        agent_id="a1", prototype="S", profile="p", hardware_class="phone", num_samples=4
    )
    return sign(reg.model_copy(update=changes), secret)


def register(
    presence: Presence, payload: bytes, registry: dict[str, AgentRecord]
) -> tuple[Verdict, Ack | None]:
    received = read(
        Registration, TOPICS, TOPICS.up("a1", Up.REGISTER), payload, registry, authenticate=False
    )
    return presence.register(received)


def test_an_agent_of_another_major_version_is_told_which_versions_are_spoken() -> None:
    # Prepare: a signed registration of protocol 2.0, and one signed with another secret
    secret = generate_secret()
    registry = {"a1": AgentRecord(agent_id="a1", prototype="S", secret=secret)}
    presence = Presence(registry, guard=ReplayGuard())
    obj = json.loads(encode_message(registration(secret))) | {"protocol": "2.0", "x": 1}
    obj["signature"] = hmac_hex(secret, signed_part(obj))
    forged = obj | {"signature": hmac_hex(generate_secret(), signed_part(obj))}
    # Execute
    verdict, ack = register(presence, canonical_bytes(obj), registry)
    _, unanswered = register(presence, canonical_bytes(forged), registry)
    # Assert
    assert verdict.reason is Refusal.UNSUPPORTED_VERSION
    assert ack is not None and ack.reason == "unsupported_version" and not ack.accepted
    assert "speaks protocol 1.0" in ack.detail and "2.0" in ack.detail
    assert ack.protocol == "1.0" and unanswered is None
    assert presence.clients() == {}


def test_stale_or_replayed_registrations_are_never_answered() -> None:
    secret = generate_secret()
    registry = {"a1": AgentRecord(agent_id="a1", prototype="S", secret=secret)}
    presence = Presence(registry, guard=ReplayGuard())
    fresh = encode_message(registration(secret))
    _, ack = register(presence, fresh, registry)
    assert ack is not None and ack.accepted
    stale = encode_message(registration(secret, sent_at=time.time() - 3600))
    for payload, why in ((fresh, Refusal.REPLAYED), (stale, Refusal.STALE_MESSAGE)):
        verdict, answer = register(presence, payload, registry)
        assert (verdict.reason, answer) == (why, None)
