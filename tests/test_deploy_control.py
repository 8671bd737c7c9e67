"""The release desk without a broker: signed offers, authenticated reports, which blobs
an agent may fetch, rollback releases made on a halt, records saved on every change;
and the release store and rollback releases it relies on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.deploy.command import load_history
from coordinator.deploy.control import ReleaseControl
from coordinator.deploy.publish import (
    Published,
    ReleaseBuildError,
    Signing,
    StoredReleases,
    load_signing,
    rollback_release,
)
from coordinator.deploy.records import RolloutState
from coordinator.deploy.rollout import Rollout, new_rollout
from coordinator.deploy.store import ReleaseStore, ReleaseStoreError
from coordinator.transport.inbound import Inbound, read
from takfl.release.keys import generate_release_key
from takfl.release.metadata import verify_release
from takfl.wire.messages import encode_message
from takfl.wire.release import ReleaseReport
from takfl.wire.signing import generate_secret, sign, verify
from takfl.wire.topics import Topics, Up
from takfl.wire.validation import AgentRecord
from tests.deploy_fixtures import FLEET, signing_for, synthetic_release

TOPICS = Topics(FLEET)
AGENTS = ["M-000", "M-001"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    """A key, a store holding releases 1 and 2 of M, and M's two agents."""

    signing: Signing
    store: ReleaseStore
    v1: Published
    v2: Published
    registry: dict[str, AgentRecord]


@pytest.fixture
def world(tmp_path: Path) -> World:
    signing = signing_for(tmp_path / "keys")
    store = ReleaseStore(tmp_path / "run")
    return World(
        signing=signing,
        store=store,
        v1=synthetic_release(store, signing, "M", seed=1),
        v2=synthetic_release(store, signing, "M", seed=2),
        registry={
            a: AgentRecord(agent_id=a, prototype="M", secret=generate_secret()) for a in AGENTS
        },
    )


RUN = "0123456789abcdef" * 2  # the release command's run, echoed by the reports


def control_for(world: World, rollout: Rollout, clock: Clock, saves: list[int]) -> ReleaseControl:
    source = StoredReleases(world.store, world.signing, {"M": 1024}, [world.v2])
    return ReleaseControl(
        world.registry,
        [rollout],
        source,
        save=lambda: saves.append(1),
        offer_retry_s=10.0,
        clock=clock,
        run_id=RUN,
    )


def received(
    registry: dict[str, AgentRecord],
    agent: str,
    version: int,
    state: str,
    secret: bytes | None = None,
    **kw: object,
) -> Inbound[ReleaseReport]:
    msg = ReleaseReport.model_validate(
        {
            "agent_id": agent,
            "prototype": "M",
            "rollout": "M-v2",
            "version": version,
            "state": state,
            "sent_at": 1.0,
            "run": RUN,
            **kw,
        }
    )
    payload = encode_message(sign(msg, secret or registry[agent].secret))
    return read(ReleaseReport, TOPICS, TOPICS.up(agent, Up.RELEASE), payload, registry)


def rollout_m(previous: int | None = 1) -> Rollout:
    return new_rollout(
        prototype="M",
        version=2,
        agents=AGENTS,
        now=1000.0,
        stages=(0.5, 1.0),
        abort_above=0.2,
        device_timeout_s=30.0,
        previous=previous,
    )


def test_offers_are_signed_per_agent_and_carry_the_signed_metadata(world: World) -> None:
    signing, v2, registry = world.signing, world.v2, world.registry
    saves: list[int] = []
    control = control_for(world, rollout_m(), Clock(), saves)

    decision = control.start()

    [(agent, offer)] = decision.offers
    assert agent == "M-000" and verify(offer, registry["M-000"].secret)
    assert not verify(offer, registry["M-001"].secret)
    assert offer.version == 2 and offer.action == "install" and offer.rollout == "M-v2"
    assert offer.chunk_size == 1024
    assert verify_release(offer.metadata.encode(), signing.root, fleet=FLEET, prototype="M").digest
    assert decision.keep == [v2] and saves


def test_an_agent_may_fetch_only_the_blobs_of_releases_offered_to_it(world: World) -> None:
    v1, v2 = world.v1, world.v2
    control = control_for(world, rollout_m(), Clock(), [])
    control.start()

    assert all(control.may_fetch("M-000", d) for d in v2.blobs)
    assert not any(control.may_fetch("M-001", d) for d in v2.blobs)  # a later stage
    assert not any(control.may_fetch("M-000", d) for d in v1.blobs)


def test_reports_with_a_wrong_signature_or_of_unknown_rollouts_are_ignored(world: World) -> None:
    registry = world.registry
    saves: list[int] = []
    r = rollout_m()
    control = control_for(world, r, Clock(), saves)
    control.start()
    saves.clear()

    forged = control.report(received(registry, "M-000", 2, "failed", secret=generate_secret()))
    other = control.report(received(registry, "M-000", 2, "failed", rollout="S-v9"))

    assert forged.lines == [] and other.lines == [] and saves == []
    assert r.devices["M-000"].state.value == "offered" and control.ignored == 1


def test_healthy_reports_promote_and_the_records_are_saved_on_every_change(world: World) -> None:
    registry = world.registry
    saves: list[int] = []
    r = rollout_m()
    control = control_for(world, r, Clock(), saves)
    control.start()

    saves.clear()
    control.report(received(registry, "M-000", 2, "downloading"))
    promoted = control.report(received(registry, "M-000", 2, "installed", latency_p50_ms=2.0))
    control.report(received(registry, "M-001", 2, "installed"))

    assert [a for a, _ in promoted.offers] == ["M-001"]
    assert len(saves) == 3 and control.done and r.state == RolloutState.COMPLETED


def test_a_halt_makes_a_rollback_release_and_offers_it(world: World) -> None:
    signing, store, v1, registry = world.signing, world.store, world.v1, world.registry
    r = rollout_m(previous=1)
    control = control_for(world, r, Clock(), [])
    control.start()

    decision = control.report(received(registry, "M-000", 2, "failed", reason="parity"))

    [(agent, offer)] = decision.offers
    back = verify_release(
        offer.metadata.encode(), signing.root, fleet=FLEET, prototype="M", trusted_version=2
    )
    assert agent == "M-000" and offer.action == "rollback" and offer.version == 3
    assert back.version == 3 and back.spec.rollback_to == 1
    assert back.model == v1.release.model and back.reference == v1.release.reference
    assert store.latest_version("M") == 3 and r.rollback_version == 3
    assert all(control.may_fetch("M-000", d) for d in v1.blobs)
    assert any("rollback release 3 signed" in line for line in decision.lines)

    control.report(received(registry, "M-000", 3, "installed", active_version=1))
    assert r.state == RolloutState.ROLLED_BACK and control.done


def test_when_no_rollback_release_can_be_made_the_rollout_stays_halted(world: World) -> None:
    registry = world.registry

    class Broken(StoredReleases):
        def make_rollback(self, prototype: str, to_version: int) -> Published:
            raise ReleaseStoreError("no release 1 of M")

    signing, store, v2 = world.signing, world.store, world.v2
    r = rollout_m(previous=1)
    control = ReleaseControl(
        registry, [r], Broken(store, signing, {"M": 1024}, [v2]), save=lambda: None, run_id=RUN
    )
    control.start()

    decision = control.report(received(registry, "M-000", 2, "failed", reason="parity"))

    assert decision.offers == [] and control.done
    assert r.state == RolloutState.HALTED and "no release 1 of M" in r.halt_reason


def test_ticks_time_devices_out_and_send_unanswered_offers_again(world: World) -> None:
    registry = world.registry
    clock = Clock()
    r = rollout_m(previous=None)
    control = control_for(world, r, clock, [])
    control.start()

    clock.now += 10.0
    again = control.tick()
    clock.now += 20.0
    timed_out = control.tick()

    assert [a for a, _ in again.offers] == ["M-000"]
    assert verify(again.offers[0][1], registry["M-000"].secret)
    assert r.devices["M-000"].state.value == "timed_out" and r.state == RolloutState.HALTED
    assert any("timed out" in line for line in timed_out.lines) and control.done


def test_stop_ends_whatever_is_unfinished(world: World) -> None:
    r = rollout_m()
    control = control_for(world, r, Clock(), [])
    control.start()

    control.stop("the --timeout of 5s passed")

    assert control.done and r.state == RolloutState.HALTED and "timeout" in r.halt_reason


# -- the store and rollback releases ----------------------------------------------------------
def test_a_rollback_is_a_newer_version_naming_the_release_it_reinstates(world: World) -> None:
    signing, store, v1 = world.signing, world.store, world.v1

    back = rollback_release(store, signing, "M", 1, chunk_size=512)
    again = rollback_release(store, signing, "M", back.version, chunk_size=512)

    assert back.version == 3 and back.release.spec.rollback_to == 1
    assert back.release.model == v1.release.model and back.blobs == v1.blobs
    assert back.release.spec.round == v1.release.spec.round
    assert again.version == 4 and again.release.spec.rollback_to == 1  # names the original
    trusted = verify_release(
        store.metadata("M", 3), signing.root, fleet=FLEET, prototype="M", trusted_version=2
    )
    assert trusted.reinstates == 1
    with pytest.raises(ReleaseStoreError, match="no release 9"):
        rollback_release(store, signing, "M", 9, chunk_size=512)


def test_stored_versions_are_never_rewritten_and_damaged_blobs_are_caught(world: World) -> None:
    store, v1 = world.store, world.v1

    store.save_metadata("M", 1, store.metadata("M", 1))  # the same bytes: fine
    with pytest.raises(ReleaseStoreError, match="never reused"):
        store.save_metadata("M", 1, store.metadata("M", 2))
    digest = v1.release.model.sha256
    store.blob_path(digest).write_bytes(b"tampered")

    with pytest.raises(ReleaseStoreError, match="damaged"):
        store.blob(digest)
    assert store.versions("M") == [1, 2] and store.latest_version("S") == 0


def test_one_release_command_at_a_time(world: World) -> None:
    store = world.store

    with (
        store.lock(),
        pytest.raises(ReleaseStoreError, match="another release"),
        ReleaseStore(store.run_dir).lock(),
    ):
        pass
    with store.lock():  # free again
        pass


def test_a_key_that_the_root_does_not_trust_is_refused(tmp_path: Path) -> None:
    generate_release_key(tmp_path / "a")
    generate_release_key(tmp_path / "b")
    (tmp_path / "a" / "root.json").write_bytes((tmp_path / "b" / "root.json").read_bytes())

    with pytest.raises(ReleaseBuildError, match="not the key"):
        load_signing(tmp_path / "a", FLEET)
    with pytest.raises(ReleaseBuildError, match="no release key"):
        load_signing(tmp_path / "none", FLEET)


def test_a_rollout_left_running_by_an_ended_command_is_stopped_on_the_next(world: World) -> None:
    store = world.store
    left = rollout_m()
    left.start(1000.0)
    done = rollout_m()
    done.id = "M-v1"
    done.stop("finished long ago", 900.0)
    store.save_rollouts([done, left])

    history = load_history(store)

    assert all(r.finished for r in history)
    again = {r.id: r for r in store.load_rollouts()}
    assert again["M-v2"].state == RolloutState.HALTED
    assert "ended before it finished" in again["M-v2"].halt_reason
    assert again["M-v1"].halt_reason == "finished long ago"
