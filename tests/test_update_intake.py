"""The update intake judges headers and chunks without a broker: bytes in, verdicts out."""

from __future__ import annotations

import time

import torch

from coordinator.transport.base import Task
from coordinator.transport.dispatch import TaskDispatch, task_message
from coordinator.transport.inbound import read
from coordinator.transport.intake import Decision, IntakePolicy, UpdateIntake
from takfl.config.base import ModelSpec
from takfl.config.profile import CommsSpec
from takfl.wire.chunking import blob_ref, split
from takfl.wire.codec import encode_state
from takfl.wire.messages import Chunk, UpdateHeader, encode_chunk, encode_message
from takfl.wire.signing import generate_secret, sign
from takfl.wire.topics import Topics, Up
from takfl.wire.update import PreparedUpdate, prepare_update, signed_update_header
from takfl.wire.validation import AgentRecord, Refusal

TOPICS = Topics("unit")
CHUNK = 256


def global_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(16, 8, generator=g), "b": torch.zeros(16)}


class Fixture:
    """A dispatch with one round-1 task for agent a1, and an intake over it."""

    def __init__(self) -> None:
        self.registry = {
            "a1": AgentRecord(agent_id="a1", prototype="S", secret=generate_secret()),
            "a2": AgentRecord(agent_id="a2", prototype="S", secret=generate_secret()),
        }
        self.dispatch = TaskDispatch(self.registry, retry_s=60.0)
        self.intake = UpdateIntake(self.registry, self.dispatch, IntakePolicy(quiet_s=60.0))
        self.state = global_state()
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
            self.registry["a1"].secret,
            comms=CommsSpec(compression="fp32"),
            num_classes=10,
            input_shape=(1, 8, 8),
        )
        self.dispatch.assign([(task, self.task)])

    def update(self, scale: float = 0.01, num_samples: int = 5) -> PreparedUpdate:
        trained = {k: v + scale for k, v in self.state.items()}
        return prepare_update(
            self.task,
            trained,
            self.state,
            secret=self.registry["a1"].secret,
            num_samples=num_samples,
            chunk_size=CHUNK,
            compression="fp32",
        )

    def header(self, header: UpdateHeader, agent: str = "a1") -> Decision:
        received = read(
            UpdateHeader,
            TOPICS,
            TOPICS.up(agent, Up.UPDATE),
            encode_message(header),
            self.registry,
            authenticate=False,
        )
        return self.intake.header(received)

    def chunks(self, chunks: list[Chunk], agent: str = "a1") -> list[Decision]:
        return [self.intake.chunk(agent, encode_chunk(c)) for c in chunks]


def reason(d: Decision) -> str:
    assert d.ack is not None
    return d.ack.reason


def test_a_good_update_is_accepted_once_its_last_chunk_arrives() -> None:
    f = Fixture()
    up = f.update()
    assert f.header(up.header).verdict.accepted
    decisions = f.chunks(split(up.blob, CHUNK))
    assert all(d.update is None for d in decisions[:-1])
    last = decisions[-1]
    assert last.update is not None and last.ack is not None and last.ack.accepted
    assert last.update.num_samples == 5
    assert torch.allclose(last.update.state["w"], f.state["w"] + 0.01)
    assert f.intake.counters.accepted == 1
    # the same header again: the same answer, no second update
    again = f.header(up.header)
    assert again.ack == last.ack and again.update is None


def test_forged_header_is_refused_and_not_remembered() -> None:
    f = Fixture()
    up = f.update()
    forged = sign(up.header, generate_secret())
    d = f.header(forged)
    assert d.ack is not None and d.ack.reason == Refusal.BAD_SIGNATURE.value
    # the genuine header with the same blob digest is still judged on its own
    assert f.header(up.header).verdict.accepted


def test_each_bad_header_with_the_same_digest_gets_its_own_reason() -> None:
    f = Fixture()
    up = f.update()
    secret = f.registry["a1"].secret
    wrong_proto = signed_update_header(up.header, secret, prototype="M")
    stale = signed_update_header(up.header, secret, round_id=0)
    wrong_base = signed_update_header(up.header, secret, base_digest="ab" * 32)
    reasons = [reason(f.header(h)) for h in (wrong_proto, stale, wrong_base)]
    assert reasons == [
        Refusal.WRONG_PROTOTYPE.value,
        Refusal.STALE_ROUND.value,
        Refusal.WRONG_BASE.value,
    ]
    # and each is answered the same way when repeated
    assert reason(f.header(stale)) == Refusal.STALE_ROUND.value


def test_header_on_another_agents_topic_is_malformed() -> None:
    f = Fixture()
    up = f.update()
    d = f.header(up.header, agent="a2")
    assert d.agent == "a2" and d.ack is not None and d.ack.reason == Refusal.MALFORMED.value


def test_tampered_chunk_fails_the_digest() -> None:
    f = Fixture()
    up = f.update()
    assert f.header(up.header).verdict.accepted
    chunks = split(up.blob, CHUNK)
    c = chunks[0]
    chunks[0] = Chunk(
        digest=c.digest,
        index=c.index,
        count=c.count,
        payload=bytes([c.payload[0] ^ 1]) + c.payload[1:],
    )
    last = f.chunks(chunks)[-1]
    assert last.ack is not None and last.ack.reason == Refusal.DIGEST_MISMATCH.value
    assert f.intake.pending() == 0


def test_nan_update_is_refused_with_non_finite() -> None:
    f = Fixture()
    trained = {k: v.clone() for k, v in f.state.items()}
    trained["w"][0, 0] = float("nan")
    up = prepare_update(
        f.task,
        trained,
        f.state,
        secret=f.registry["a1"].secret,
        num_samples=5,
        chunk_size=CHUNK,
        compression="fp32",
    )
    assert f.header(up.header).verdict.accepted
    last = f.chunks(split(up.blob, CHUNK))[-1]
    assert last.ack is not None and last.ack.reason == Refusal.NON_FINITE.value


def test_unassigned_agent_and_unannounced_chunks() -> None:
    f = Fixture()
    up = f.update()
    other = signed_update_header(up.header, f.registry["a2"].secret, agent_id="a2")
    d = f.header(other, agent="a2")
    assert d.ack is not None and d.ack.reason == Refusal.NOT_ASSIGNED.value
    assert all(d.update is None for d in f.chunks(split(up.blob, CHUNK)))
    assert f.intake.counters.ignored_chunks == len(split(up.blob, CHUNK))
    assert f.intake.chunk("a1", b"garbage").ack is None
    assert f.intake.counters.malformed_chunks == 1
