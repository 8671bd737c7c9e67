"""The global model on its way down as a delta (``takfl.wire.downlink``), the coordinator's
plan of who gets what (``coordinator.transport.downlinks``), an agent's codec state
(``edge_agent.codec_state``) and its intake of a delta task (``edge_agent.intake``)."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest
import torch

from coordinator.transport.downlinks import Downlinks
from edge_agent.codec_state import MODELS_DIR, RESIDUAL_FILE, CodecState
from edge_agent.inbound import InboundReader
from edge_agent.intake import IntakePolicy, TaskIntake
from takfl.state import State
from takfl.wire.chunking import blob_ref, split
from takfl.wire.codec import encode_state
from takfl.wire.codecs import resolve_codec
from takfl.wire.downlink import (
    BaseUnknown,
    ModelMismatch,
    delta_downlink,
    full_downlink,
    model_digest,
    received_model,
)
from takfl.wire.errors import CodecError
from takfl.wire.messages import ModelRef, TaskMessage, encode_chunk, encode_message
from takfl.wire.signing import generate_secret, sign
from takfl.wire.update import prepare_update

CHUNK = 512
SECRET = generate_secret()


def state(seed: int, scale: float = 1.0) -> State:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(32, 16, generator=g) * scale,
        "b": torch.randn(32, generator=g) * scale,
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def moved(base: State, seed: int, step: float = 0.05) -> State:
    """``base`` after a round: every float moved by a small random step."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {k: v + step * torch.randn(v.shape, generator=g) for k, v in base.items() if k != "steps"}
    return out | {"steps": base["steps"] + 1}


def error(a: State, b: State) -> float:
    return float(sum(torch.linalg.vector_norm(a[k] - b[k]) ** 2 for k in ("w", "b")) ** 0.5)


# -- the pure downlink ------------------------------------------------------------------


def test_a_full_model_is_named_by_its_blobs_digest() -> None:
    g = state(0)
    plan = full_downlink(g)
    assert plan.base is None
    assert plan.digest == hashlib.sha256(plan.blob).hexdigest() == model_digest(g)
    assert torch.equal(plan.state["w"], g["w"]) and int(plan.state["steps"]) == 0


@pytest.mark.parametrize("codec", ["rot2", "sign1", "topk-int8:density=0.1", "fp16"])
def test_a_delta_rebuilds_exactly_the_model_the_coordinator_signs(codec: str) -> None:
    # Prepare: the agent holds last round's model
    held = full_downlink(state(0)).state
    new = moved(held, 1)
    # Execute
    plan = delta_downlink(new, held, model_digest(held), resolve_codec(codec), seed=3)
    got = received_model(plan.blob, base=plan.base, expected=plan.digest, held=held)
    # Assert: the agent's model is the coordinator's reconstruction, bit for bit, and
    # far smaller than the full model for the sub-byte codecs
    assert model_digest(got) == plan.digest
    assert int(got["steps"]) == 1
    if codec in ("rot2", "sign1"):
        assert len(plan.blob) < 0.1 * len(full_downlink(new).blob)


def test_lossy_deltas_do_not_drift_what_one_round_leaves_out_goes_the_next() -> None:
    # Prepare: the global moves for 8 rounds, then stays; each delta is against what the
    # agent rebuilt, never against the coordinator's exact global
    codec = resolve_codec("sign1")
    held = full_downlink(state(0)).state
    glob = held
    errors = []
    for r in range(1, 15):
        glob = moved(glob, r) if r <= 8 else glob
        plan = delta_downlink(glob, held, model_digest(held), codec, seed=r)
        held = plan.state
        errors.append(error(held, glob))
    # Assert: once the global stops moving the agent's copy converges to it
    assert errors[-1] < 0.25 * errors[7]
    assert errors[-1] < errors[-4]


def test_a_delta_the_agent_cannot_apply_is_refused_for_what_went_wrong() -> None:
    held = full_downlink(state(0)).state
    plan = delta_downlink(moved(held, 1), held, model_digest(held), resolve_codec("rot2"))
    with pytest.raises(BaseUnknown):
        received_model(plan.blob, base=plan.base, expected=plan.digest, held=None)
    other = full_downlink(state(5)).state  # holds another model of the same layout
    with pytest.raises(ModelMismatch):
        received_model(plan.blob, base=plan.base, expected=plan.digest, held=other)
    smaller = {"w": torch.zeros(8, 16), "b": torch.zeros(32), "steps": torch.tensor(0)}
    with pytest.raises(CodecError):
        received_model(plan.blob, base=plan.base, expected=plan.digest, held=smaller)
    tampered = bytearray(full_downlink(held).blob)
    tampered[-1] ^= 1
    with pytest.raises(ModelMismatch):
        received_model(bytes(tampered), base=None, expected=model_digest(held), held=None)


# -- the coordinator's plan -------------------------------------------------------------


def test_agents_holding_the_same_model_share_one_delta_and_newcomers_get_it_full() -> None:
    # Prepare
    down = Downlinks({"S": resolve_codec("rot2")})
    g1 = state(0)
    first = {a: down.plan(1, "S", a, g1) for a in ("a", "b")}
    for a, plan in first.items():
        down.holds(a, plan.digest)
    g2 = moved(g1, 2)
    # Execute
    a2, b2, c2 = (down.plan(2, "S", a, g2) for a in ("a", "b", "c"))
    # Assert
    assert all(p.base is None for p in first.values())
    assert a2 is b2 and a2.base == first["a"].digest  # one encoding for both
    assert c2.base is None  # holds nothing: the full model
    assert len(a2.blob) < 0.1 * len(c2.blob)


def test_a_refused_delta_and_a_changed_shape_fall_back_to_the_full_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = Downlinks(default=resolve_codec("sign1"))
    plan = down.plan(1, "M", "a", state(0))
    down.holds("a", plan.digest)
    down.forget("a")  # it refused a delta
    assert down.plan(2, "M", "a", moved(state(0), 1)).base is None
    down.holds("a", down.plan(2, "M", "a", moved(state(0), 1)).digest)
    reshaped = {"w": torch.zeros(8, 16), "b": torch.zeros(32), "steps": torch.tensor(0)}
    with caplog.at_level(logging.INFO, logger="coordinator.transport.downlinks"):
        assert down.plan(3, "M", "a", reshaped).base is None
    assert "full model instead of a delta" in caplog.text


def test_a_prototype_without_a_downstream_codec_always_gets_the_full_model() -> None:
    down = Downlinks({"S": resolve_codec("rot2")})
    plan = down.plan(1, "L", "x", state(0))
    down.holds("x", plan.digest)
    assert down.plan(2, "L", "x", moved(state(0), 1)).base is None


# -- the agent's codec state ------------------------------------------------------------


def test_the_residual_survives_a_restart_and_is_dropped_for_another_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    residual = {"w": torch.randn(4, 4)}
    CodecState(tmp_path).keep_residual("run-1", "S", residual)
    # Execute: a new process reads it back
    again = CodecState(tmp_path)
    kept = again.residual("run-1", "S")
    # Assert
    assert kept is not None and torch.equal(kept["w"], residual["w"])
    with caplog.at_level(logging.INFO, logger="edge_agent.codec_state"):
        assert CodecState(tmp_path).residual("run-2", "S") is None
    assert "residual of run run-1 (S) dropped" in caplog.text
    assert not (tmp_path / RESIDUAL_FILE).exists()


def test_a_torn_residual_file_is_dropped_not_trusted(tmp_path: Path) -> None:
    (tmp_path / RESIDUAL_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    assert CodecState(tmp_path).residual("run-1", "S") is None
    assert not (tmp_path / RESIDUAL_FILE).exists()


def test_a_residual_for_another_model_shape_is_dropped_when_the_update_is_made(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = full_downlink(state(0)).state
    task = task_message(full_downlink(base).blob, compression="sign1", round_id=1)
    stale = {"w": torch.zeros(3, 3), "b": torch.zeros(32)}
    with caplog.at_level(logging.WARNING, logger="takfl.wire.codecs"):
        up = prepare_update(
            task, moved(base, 1), base, secret=SECRET, num_samples=5, residual=stale
        )
    assert "residual dropped" in caplog.text
    assert up.residual is not None and up.residual["w"].shape == (32, 16)
    assert up.header.compression == "sign1:block=256,density=1"


def test_held_models_are_kept_newest_first_and_checked_against_their_names(
    tmp_path: Path,
) -> None:
    store = CodecState(tmp_path, keep_models=2)
    models = [full_downlink(state(i)).state for i in range(3)]
    for m in models:
        store.keep_model(model_digest(m), m)
    digests = [model_digest(m) for m in models]
    assert store.model(digests[0]) is None  # the oldest went
    assert sorted(p.stem for p in (tmp_path / MODELS_DIR).iterdir()) == sorted(digests[1:])
    # a file changed on disk is not trusted after a restart
    path = tmp_path / MODELS_DIR / f"{digests[2]}.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    again = CodecState(tmp_path, keep_models=2)
    assert again.model(digests[2]) is None and again.model(digests[1]) is not None


# -- the agent's intake of a delta task -------------------------------------------------


def task_message(blob: bytes, **fields: object) -> TaskMessage:
    """A task of agent a1 (prototype S) offering ``blob``; ``fields`` change it."""
    values: dict[str, object] = {
        "round_id": 2,
        "agent_id": "a1",
        "prototype": "S",
        "model": ModelRef(builder="mlp_digits"),
        "num_classes": 10,
        "input_shape": (1, 8, 8),
        "seed": 7,
        "deadline": time.time() + 60,
        "compression": "fp16",
        "chunk_size": CHUNK,
        "blob": blob_ref(blob, CHUNK),
    }
    return TaskMessage.model_validate(values | fields)


def delta_task(blob: bytes, *, base: str, digest: str) -> TaskMessage:
    return sign(task_message(blob, base=base, model_digest=digest), SECRET)


def deliver(
    intake: TaskIntake, task: TaskMessage, blob: bytes
) -> tuple[list[object], list[object]]:
    """The acks and ready tasks of ``task`` and every chunk of ``blob``."""
    reader = InboundReader("a1", SECRET, "S")
    first = intake.task(reader.task(encode_message(task)))
    acks, ready = list(first.acks), list(first.ready)
    if first.acks and not first.acks[0].accepted:
        return acks, ready
    for c in split(blob, CHUNK):
        d = intake.chunk(encode_chunk(c))
        acks += d.acks
        ready += d.ready
    return acks, ready


def test_an_agent_rebuilds_a_delta_against_the_model_it_holds() -> None:
    held = full_downlink(state(0)).state
    store = CodecState()
    store.keep_model(model_digest(held), held)
    plan = delta_downlink(moved(held, 1), held, model_digest(held), resolve_codec("rot2"))
    unit = TaskIntake("a1", IntakePolicy(), held=store)
    acks, ready = deliver(
        unit, delta_task(plan.blob, base=model_digest(held), digest=plan.digest), plan.blob
    )
    assert [a.accepted for a in acks] == [True]  # type: ignore[attr-defined]
    (got,) = ready
    assert model_digest(got.global_state) == plan.digest  # type: ignore[attr-defined]
    assert store.model(plan.digest) is not None  # held for the next delta


def test_an_agent_asks_for_the_full_model_when_it_does_not_hold_the_base() -> None:
    held = full_downlink(state(0)).state
    plan = delta_downlink(moved(held, 1), held, model_digest(held), resolve_codec("rot2"))
    unit = TaskIntake("a1", IntakePolicy(), held=CodecState())
    acks, ready = deliver(
        unit, delta_task(plan.blob, base=model_digest(held), digest=plan.digest), plan.blob
    )
    assert ready == []
    assert [(a.accepted, a.reason) for a in acks] == [(False, "wrong_base")]  # type: ignore[attr-defined]


def test_an_agent_refuses_a_delta_that_does_not_rebuild_the_signed_model() -> None:
    held = full_downlink(state(0)).state
    store = CodecState()
    store.keep_model(model_digest(held), held)
    plan = delta_downlink(moved(held, 1), held, model_digest(held), resolve_codec("rot2"))
    wrong = model_digest(full_downlink(state(9)).state)
    unit = TaskIntake("a1", IntakePolicy(), held=store)
    acks, ready = deliver(
        unit, delta_task(plan.blob, base=model_digest(held), digest=wrong), plan.blob
    )
    assert ready == []
    assert [(a.accepted, a.reason) for a in acks] == [(True, "ok"), (False, "digest_mismatch")]  # type: ignore[attr-defined]


def test_a_task_names_a_base_only_with_the_model_it_makes() -> None:
    blob = encode_state(state(0), "fp32")
    with pytest.raises(ValueError, match="base and model_digest"):
        task_message(blob, base="ab" * 32)


def test_only_the_newest_bases_of_a_prototype_are_kept_for_deltas() -> None:
    # Prepare: agent k last received round k's model, for six rounds
    from coordinator.transport.downlinks import MAX_BASES

    down = Downlinks({"S": resolve_codec("rot2")})
    g = state(0)
    for r in range(1, 7):
        g = moved(g, r)
        plan = down.plan(r, "S", f"a{r}", g)
        down.holds(f"a{r}", plan.digest)
    # Execute: round 7 for every one of them
    g = moved(g, 7)
    plans = {a: down.plan(7, "S", a, g) for a in (f"a{r}" for r in range(1, 7))}
    # Assert: the newest MAX_BASES holders get deltas, the older ones the full model
    deltas = [a for a, p in plans.items() if p.base is not None]
    assert deltas == [f"a{r}" for r in range(7 - MAX_BASES, 7)]
