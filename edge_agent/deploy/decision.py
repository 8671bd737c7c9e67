"""What the installer answers: reports to publish, blobs to fetch or drop, an install
to run. Plain data; the release channel acts on it."""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.deploy.slots import SlotRecord
from takfl.release.metadata import Release
from takfl.wire.messages import BlobRef
from takfl.wire.release import ReleaseOffer, ReleaseReport


@dataclass(frozen=True, kw_only=True)
class InstallJob:
    """A release whose artifacts are all in the staging slot, ready to load and check."""

    offer: ReleaseOffer
    release: Release
    record: SlotRecord
    received_at: float  # clock() when the offer arrived


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What to do after one input: publish ``reports`` (unsigned), expect and request the
    chunks of ``fetch``, stop receiving ``drop`` (digests), run ``job`` on a worker."""

    reports: tuple[ReleaseReport, ...] = ()
    fetch: tuple[BlobRef, ...] = ()
    drop: tuple[str, ...] = ()
    job: InstallJob | None = None

    def __add__(self, other: Decision) -> Decision:
        return Decision(
            reports=self.reports + other.reports,
            fetch=self.fetch + other.fetch,
            drop=self.drop + other.drop,
            job=other.job or self.job,
        )


NOTHING = Decision()
