"""The vectors of one round: a registration, a task, its global model and chunks, the
update in every codec, and every control message an agent sends or receives (acks,
statuses, chunk requests, global announcements). Every signed message, in either
direction, is signed with the agent's own secret; the coordinator holds no key of its
own, so its presence and the broadcast copy of a global announcement are unsigned."""

from __future__ import annotations

from typing import Any

from takfl.wire.chunking import blob_ref, split
from takfl.wire.codec import decode_state, encode_state
from takfl.wire.codecs import decode_blob, resolve_codec
from takfl.wire.downlink import delta_downlink, model_digest
from takfl.wire.messages import (
    COMPRESSIONS,
    Ack,
    AckSubject,
    ChunkRequest,
    GlobalAnnouncement,
    InputNorm,
    ModelRef,
    Registration,
    Status,
    TaskMessage,
    TrainingRef,
    encode_chunk,
)
from takfl.wire.reasons import Refusal
from takfl.wire.signing import object_ref
from takfl.wire.telemetry import PlatformInfo, Telemetry
from takfl.wire.topics import Down, Topics, Up
from takfl.wire.update import prepare_update
from takfl.wire_vectors.fixed import (
    AGENT,
    AGENT_SIDE,
    CHUNK_SIZE,
    COORDINATOR,
    COORDINATOR_ID,
    FLEET,
    NUM_SAMPLES,
    OTHER_RUN,
    PROGRAM,
    PROTOTYPE,
    ROUND,
    RUN,
    SECRET,
    SENT_AT,
    Files,
    Vector,
    global_state,
    signed_vector,
    stamp,
    stamped,
    tensors,
    trained_state,
    unsigned_vector,
)

TOPICS = Topics(FLEET)
Vectors = dict[str, Vector]


def chunk_files(prefix: str, blob: bytes) -> Files:
    """``<prefix>.chunk-NNN.bin``: the binary chunks of ``blob``."""
    return {f"{prefix}.chunk-{c.index:03d}.bin": encode_chunk(c) for c in split(blob, CHUNK_SIZE)}


def global_blob() -> bytes:
    return encode_state(global_state(), "fp32")


def golden_task(glob: bytes) -> TaskMessage:
    """The task of round ``ROUND`` offering ``glob`` to ``AGENT`` (weight decay 5e-05: a
    float that canonicalises in exponent form; unsigned)."""
    task = TaskMessage(
        **stamp("task"),
        round_id=ROUND,
        agent_id=AGENT,
        prototype=PROTOTYPE,
        model=ModelRef(builder="mlp_digits", args={"width": 8}),
        num_classes=3,
        input_shape=(1, 2, 2),
        seed=42,
        deadline=SENT_AT + 600,
        compression="fp16",
        chunk_size=CHUNK_SIZE,
        blob=blob_ref(glob, CHUNK_SIZE),
        training=TrainingRef(
            epochs=1, batch_size=8, optimizer="sgd", learning_rate=0.01, weight_decay=5e-05
        ),
        input_norm=InputNorm(mean=[0.5], std=[0.25]),
    )
    return task


def golden_registration() -> Registration:
    """``AGENT``'s registration, before it saw any run (no telemetry; unsigned)."""
    return Registration(
        **stamp("registration", run=""),
        agent_id=AGENT,
        prototype=PROTOTYPE,
        profile="android-phone",
        hardware_class="phone",
        num_samples=NUM_SAMPLES,
    )


# the packed codecs shown (a delta against the global; no residual yet): one of each kind
PACKED_SHOWN = ("topk-int8:density=0.25", "sign1", "rot2")


def update_vectors(task: TaskMessage) -> tuple[Files, Vectors, dict[str, Any]]:
    """The answer to ``task`` in every per-tensor codec and one of each packed kind:
    (blob files, vectors, manifest ``updates``). Only the task's compression (fp16) is
    accepted for this task; the others show their bytes (a task asking for them gets
    those)."""
    files: Files = {}
    vectors: Vectors = {}
    entries: dict[str, Any] = {}
    for i, choice in enumerate(COMPRESSIONS + PACKED_SHOWN):
        codec = choice.partition(":")[0]
        up = prepare_update(
            task,
            trained_state(),
            global_state(),
            secret=SECRET,
            num_samples=NUM_SAMPLES,
            metrics={"train_loss": 0.5},
            compression=choice,
        )
        name = f"update-{codec}"
        header = stamped(up.header, name, offset=60 + i)
        vectors[name] = signed_vector(header, TOPICS.up(AGENT, Up.UPDATE), AGENT_SIDE)
        files[f"{name}.safetensors"] = up.blob
        files.update(chunk_files(name, up.blob))
        entries[codec] = {
            "header": f"{name}.json",
            "signed_bytes": f"{name}.signed-bytes.bin",
            "signature": vectors[name].obj["signature"],
            "blob": f"{name}.safetensors",
            "chunks": len(split(up.blob, CHUNK_SIZE)),
            "decoded_delta": tensors(decode_blob(up.blob, global_state())),
        }
    return files, vectors, entries


DOWNLINK_CODEC = "rot2"


def downlink_vectors(task: TaskMessage) -> tuple[Files, Vectors, dict[str, Any]]:
    """The next round's task as a delta: the trained state as the new global, sent as a
    ``rot2`` delta against the round's global (which the agent holds), with the model
    digest of what the agent rebuilds."""
    base = model_digest(decode_state(global_blob()))
    plan = delta_downlink(
        trained_state(), global_state(), base, resolve_codec(DOWNLINK_CODEC), seed=ROUND + 1
    )
    delta_task = task.model_copy(
        update={
            "round_id": ROUND + 1,
            "blob": blob_ref(plan.blob, CHUNK_SIZE),
            "base": base,
            "model_digest": plan.digest,
        }
    )
    name = "task-delta"
    message = stamped(delta_task, name, offset=90)
    vectors = {name: signed_vector(message, TOPICS.down(AGENT, Down.TASK), COORDINATOR)}
    files = {"global-delta.bin": plan.blob, **chunk_files("global-delta", plan.blob)}
    entry = {
        "task": f"{name}.json",
        "codec": str(resolve_codec(DOWNLINK_CODEC)),
        "blob": "global-delta.bin",
        "base": base,
        "model_digest": plan.digest,
        "reconstructed": tensors(plan.state),
    }
    return files, vectors, entry


def round_vectors(task: TaskMessage, registration: Registration) -> Vectors:
    """The registration (and one with telemetry), the task (and one offering a training
    program)."""
    platform = PlatformInfo(
        machine="aarch64", system="Android", release="14", cpus=8, runtimes={"executorch": "1.5.1"}
    )
    telemetry = Telemetry(platform=platform, threads=2, rss_limit_mb=768.0)
    with_telemetry = stamped(
        registration.model_copy(update={"telemetry": telemetry}), "registration-telemetry"
    )
    program_task = stamped(
        task.model_copy(update={"program": blob_ref(PROGRAM, CHUNK_SIZE)}), "task-program"
    )
    up, down = TOPICS.up(AGENT, Up.REGISTER), TOPICS.down(AGENT, Down.TASK)
    return {
        "registration": signed_vector(registration, up, AGENT_SIDE),
        "registration-telemetry": signed_vector(with_telemetry, up, AGENT_SIDE),
        "task": signed_vector(task, down, COORDINATOR),
        "task-program": signed_vector(program_task, down, COORDINATOR),
    }


def _ack(
    name: str, subject: AckSubject, digest: str, accepted: bool, sender: str, **more: Any
) -> Vector:
    """An ack of ``subject`` sent by ``sender``, on the receiving side's ack topic."""
    envelope = stamp(name, offset=more.pop("offset", 30), run=more.pop("run", RUN))
    msg = Ack(**envelope, subject=subject, agent_id=AGENT, digest=digest, accepted=accepted, **more)
    topic = TOPICS.down(AGENT, Down.ACK) if sender == COORDINATOR else TOPICS.up(AGENT, Up.ACK)
    return signed_vector(msg, topic, sender)


def ack_vectors(registration: Vector, task: TaskMessage, update: Vector) -> Vectors:
    """Each ack, accepting and refusing: of the registration, the task and the update
    (refused as of another run, and after the run finished, too)."""
    reg = message_ref_of(registration)
    c, a, digest = COORDINATOR, AGENT_SIDE, str(update.obj["blob"]["digest"])
    task_digest = task.blob.digest
    return {
        "ack-register": _ack("ack-register", "register", reg, True, c, run=""),
        "ack-register-refused": _ack(
            "ack-register-refused",
            "register",
            reg,
            False,
            c,
            run="",
            reason=Refusal.WRONG_PROTOTYPE.value,
            detail="S-000 is registered for prototype S, not M",
        ),
        "ack-task": _ack("ack-task", "task", task_digest, True, a, round_id=ROUND),
        "ack-task-refused": _ack(
            "ack-task-refused",
            "task",
            task_digest,
            False,
            a,
            round_id=ROUND,
            reason=Refusal.TOO_LARGE.value,
        ),
        "ack-update": _ack("ack-update", "update", digest, True, c, round_id=ROUND, offset=90),
        "ack-update-refused": _ack(
            "ack-update-refused",
            "update",
            digest,
            False,
            c,
            round_id=ROUND,
            offset=90,
            reason=Refusal.STALE_ROUND.value,
            detail="round 3 is closed; the current round is 4",
        ),
        "ack-update-other-run": _ack(
            "ack-update-other-run",
            "update",
            digest,
            False,
            c,
            round_id=ROUND,
            offset=90,
            run=OTHER_RUN,
            reason=Refusal.OTHER_RUN.value,
            detail=f"run '{OTHER_RUN}', this run is {RUN}",
        ),
        "ack-update-run-finished": _ack(
            "ack-update-run-finished",
            "update",
            digest,
            False,
            c,
            round_id=ROUND,
            offset=90,
            reason=Refusal.RUN_FINISHED.value,
            detail=f"run {RUN} has ended",
        ),
    }


def message_ref_of(vector: Vector) -> str:
    """The reference of a registration vector (what its ack's ``digest`` names)."""
    return object_ref(vector.obj)


def status_vectors() -> Vectors:
    """The agent's presence (signed) and the coordinator's (unsigned), each with its will.
    A will is made when its connection starts: same ``time`` and ``sent_at`` as the
    ``online`` of that connection (a status is exempt from the replay window)."""
    agent, coordinator = TOPICS.up(AGENT, Up.STATUS), TOPICS.coordinator_status()

    def agent_status(name: str, state: Any) -> Status:
        return Status(
            **stamp(name),
            agent_id=AGENT,
            prototype=PROTOTYPE,
            state=state,
            time=SENT_AT,
        )

    def coordinator_status(name: str, state: Any, at: float) -> Status:
        envelope = stamp(name) | {"sent_at": at}
        return Status(**envelope, agent_id=COORDINATOR_ID, state=state, time=at)

    return {
        "status-online": signed_vector(agent_status("status-online", "online"), agent, AGENT_SIDE),
        "status-offline": signed_vector(
            agent_status("status-offline", "offline"), agent, AGENT_SIDE
        ),
        "status-coordinator-online": unsigned_vector(
            coordinator_status("status-coordinator-online", "online", SENT_AT), coordinator
        ),
        "status-coordinator-offline": unsigned_vector(
            coordinator_status("status-coordinator-offline", "offline", 0.0), coordinator
        ),
    }


def request_vectors(task: TaskMessage, update: Vector) -> Vectors:
    """Requests for missing chunks: of the global model and the program (by the agent) and
    of the update (by the coordinator)."""
    program = blob_ref(PROGRAM, CHUNK_SIZE)

    def request(name: str, digest: str, missing: list[int]) -> ChunkRequest:
        return ChunkRequest(**stamp(name, 10), agent_id=AGENT, digest=digest, missing=missing)

    up, down = TOPICS.up(AGENT, Up.REQUEST), TOPICS.down(AGENT, Down.REQUEST)
    digest = str(update.obj["blob"]["digest"])
    return {
        "chunk-request-global": signed_vector(
            request("chunk-request-global", task.blob.digest, [1]), up, AGENT_SIDE
        ),
        "chunk-request-program": signed_vector(
            request("chunk-request-program", program.digest, list(range(program.count))),
            up,
            AGENT_SIDE,
        ),
        "chunk-request-update": signed_vector(
            request("chunk-request-update", digest, [0]), down, COORDINATOR
        ),
    }


def global_vectors(task: TaskMessage) -> Vectors:
    """The new global model announced to one agent (signed) and broadcast (unsigned)."""

    def announcement(name: str, agent: str | None) -> GlobalAnnouncement:
        return GlobalAnnouncement(
            **stamp(name, 120),
            round_id=ROUND,
            prototype=PROTOTYPE,
            digest=task.blob.digest,
            size=task.blob.size,
            agent_id=agent,
        )

    return {
        "global-agent": signed_vector(
            announcement("global-agent", AGENT), TOPICS.down(AGENT, Down.GLOBAL), COORDINATOR
        ),
        "global-broadcast": unsigned_vector(
            announcement("global-broadcast", None), TOPICS.global_model(PROTOTYPE)
        ),
    }
