"""The release channel without a broker: what it publishes (signed chunk requests and
reports) for the offers and chunks it is handed, as an MQTT client would hand them."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Root

from edge_agent.deploy.channel import ChannelPolicy, ReleaseChannel
from takfl.release.keys import make_root, parse_root
from takfl.wire.chunking import ReassemblyLimits, split
from takfl.wire.messages import ChunkRequest, decode_message, encode_message
from takfl.wire.release import ReleaseOffer, ReleaseReport
from takfl.wire.signing import generate_secret, verify
from takfl.wire.topics import Topics, Up
from tests.release_fixtures import AGENT, FLEET, Built, build, installer, offer, onnx_model

SECRET = generate_secret()
TOPICS = Topics(FLEET)
CHUNK = 512


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Published(list[tuple[str, bytes]]):
    """Messages the channel published, as (topic, payload)."""

    def __call__(self, topic: str, payload: bytes) -> bool:
        self.append((topic, payload))
        return True

    def requests(self) -> list[ChunkRequest]:
        topic = TOPICS.up(AGENT, Up.REQUEST)
        return [decode_message(ChunkRequest, p) for t, p in self if t == topic]

    def reports(self) -> list[ReleaseReport]:
        topic = TOPICS.up(AGENT, Up.RELEASE)
        return [decode_message(ReleaseReport, p) for t, p in self if t == topic]


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


@pytest.fixture(scope="module")
def root(signer: CryptoSigner) -> Root:
    return parse_root(make_root(signer))


@pytest.fixture(scope="module")
def release(signer: CryptoSigner) -> Built:
    return build(signer, 1, onnx_model(1))


def channel(tmp_path: Path, root: Root, clock: Clock) -> tuple[ReleaseChannel, Published]:
    published = Published()
    policy = ChannelPolicy(quiet_s=2.0, limits=ReassemblyLimits(max_pending=2, timeout_s=30.0))
    ch = ReleaseChannel(
        installer(tmp_path / "state", root, clock=clock),
        agent_id=AGENT,
        secret=SECRET,
        fleet=FLEET,
        publish=published,
        policy=policy,
        clock=clock,
    )
    return ch, published


def finish(ch: ReleaseChannel) -> None:
    """Let the install worker end, then publish its result as the next tick does."""
    assert ch.wait_idle(60)
    ch.tick()


def test_an_offer_is_fetched_by_signed_requests_installed_and_reported(
    tmp_path: Path, root: Root, release: Built
) -> None:
    # Prepare
    clock = Clock()
    ch, published = channel(tmp_path, root, clock)
    # Execute: the offer, then every chunk the requests ask for, plus a stranger's chunk
    ch.on_offer(ch.offer_topic, encode_message(offer(release, SECRET, chunk_size=CHUNK)))
    requests = published.requests()
    stranger = split(b"not a release artifact" * 100, CHUNK)[0]
    taken_stranger = ch.on_chunk(stranger)
    taken = [ch.on_chunk(c) for data in release.blobs.values() for c in split(data, CHUNK)]
    finish(ch)
    # Assert: one request per artifact for all its chunks, signed for this agent
    assert sorted(r.digest for r in requests) == sorted(release.blobs)
    for r in requests:
        assert verify(r, SECRET) and r.agent_id == AGENT
        size = len(release.blobs[r.digest])
        assert r.missing == list(range(-(-size // CHUNK)))
    assert not taken_stranger and all(taken)
    reports = published.reports()
    assert [r.state for r in reports] == ["downloading", "verifying", "installed"]
    assert all(verify(r, SECRET) for r in reports)
    assert ch.installer.holder.version == 1


@pytest.mark.parametrize(
    "forge",
    [
        lambda m: m.model_copy(update={"signature": ""}),
        lambda m: m.model_copy(update={"agent_id": "a2"}),
        lambda m: offer_with_secret(m),
    ],
    ids=["unsigned", "other-agent", "other-secret"],
)
def test_offers_not_signed_for_this_agent_are_ignored(
    tmp_path: Path, root: Root, release: Built, forge: Callable[[ReleaseOffer], ReleaseOffer]
) -> None:
    ch, published = channel(tmp_path, root, Clock())

    ch.on_offer(ch.offer_topic, encode_message(forge(offer(release, SECRET))))
    ch.on_offer(ch.offer_topic, b"{not json")

    assert published == []
    assert ch.counters.unauthenticated == 1 and ch.counters.bad_offers == 1


def offer_with_secret(message: ReleaseOffer) -> ReleaseOffer:
    from takfl.wire.signing import sign

    return sign(message, generate_secret())


def test_a_tampered_chunk_fails_the_install_as_a_bad_artifact(
    tmp_path: Path, root: Root, release: Built
) -> None:
    # Prepare
    ch, published = channel(tmp_path, root, Clock())
    ch.on_offer(ch.offer_topic, encode_message(offer(release, SECRET, chunk_size=CHUNK)))
    digest = next(iter(release.blobs))
    chunks = split(release.blobs[digest], CHUNK)
    bad = dataclasses.replace(chunks[0], payload=b"\x00" * len(chunks[0].payload))
    # Execute: the artifact completes with one chunk's payload replaced
    for c in [bad, *chunks[1:]]:
        assert ch.on_chunk(c)
    # Assert
    reports = published.reports()
    assert [r.state for r in reports] == ["downloading", "failed"]
    assert reports[-1].reason == "bad_artifact"
    assert ch.installer.holder.get() is None


def test_missing_chunks_are_asked_for_again_and_a_stall_fails_the_download(
    tmp_path: Path, root: Root, release: Built
) -> None:
    # Prepare: all chunks but the last of each artifact arrive
    clock = Clock()
    ch, published = channel(tmp_path, root, clock)
    ch.on_offer(ch.offer_topic, encode_message(offer(release, SECRET, chunk_size=CHUNK)))
    for data in release.blobs.values():
        for c in split(data, CHUNK)[:-1]:
            ch.on_chunk(c)
    first = len(published.requests())
    # Execute: quiet past quiet_s, then past the reassembly timeout
    clock.now += 3
    ch.tick()
    again = published.requests()[first:]
    clock.now += 31
    ch.tick()
    # Assert: the last chunk of each was asked for again; then the download failed
    assert sorted(r.missing for r in again) == sorted(
        [[len(split(d, CHUNK)) - 1] for d in release.blobs.values()]
    )
    reports = published.reports()
    assert [r.state for r in reports] == ["downloading", "failed"]
    assert reports[-1].reason == "download_failed"


def test_an_offer_during_an_install_is_judged_when_it_ends(
    tmp_path: Path, root: Root, release: Built
) -> None:
    # Prepare: release 1 arriving; the same offer again while it installs
    ch, published = channel(tmp_path, root, Clock())
    message = encode_message(offer(release, SECRET, chunk_size=CHUNK))
    ch.on_offer(ch.offer_topic, message)
    for data in release.blobs.values():
        for c in split(data, CHUNK):
            ch.on_chunk(c)
    # the worker is installing now; the desk offers again (a fresh stamp, as every send)
    ch.on_offer(ch.offer_topic, encode_message(offer(release, SECRET, chunk_size=CHUNK)))
    # Execute
    finish(ch)
    end = time.monotonic() + 10
    while len(published.reports()) < 4 and time.monotonic() < end:
        ch.tick()
    # Assert: the repeated offer is answered after the install, without a second one
    reports = published.reports()
    assert [r.state for r in reports] == ["downloading", "verifying", "installed", "installed"]
    assert sorted(r.detail for r in reports[2:]) == ["", "already serving this release"]
    assert ch.installer.counters.installed == 1
