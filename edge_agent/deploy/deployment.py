"""Everything a device needs to install releases and serve them, built in one place.

    deployment = Deployment(config, publish=client.publish)   # any MqttClient's publish
    deployment.open()                 # recover the slots, load the active model (if any)
    client.route(deployment.channel.offer_topic, deployment.channel.on_offer)
    ...offer chunks to deployment.channel.on_chunk, call deployment.channel.tick...
    LocalServer(deployment.app(), endpoint).start()

``takfl-agent serve`` (:mod:`edge_agent.deploy.service`) wires it to its own MQTT client;
the training agent can wire the same object to the client of its link.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tuf.api.metadata import Root

from edge_agent.deploy.channel import ChannelPolicy, Publish, ReleaseChannel
from edge_agent.deploy.installer import Installer, InstallPolicy
from edge_agent.deploy.slots import ActiveSlot, SlotStore
from edge_agent.serving.app import InferenceApp, RequestLimits
from edge_agent.serving.model import ModelHolder, ServedModel
from edge_agent.serving.stats import InferenceStats
from export.runtimes import load_artifact
from takfl.config.profile import DeviceProfile
from takfl.release.metadata import ReleaseRefused, read_installed
from takfl.wire.messages import InferenceStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DeployConfig:
    """Who the device is and where its releases live."""

    profile: DeviceProfile
    fleet: str
    agent_id: str
    secret: bytes = field(repr=False)
    root: Root  # the fleet's release root (``--release-root root.json``)
    state_dir: Path  # slots and trust state (``--state-dir``)
    install: InstallPolicy = field(default_factory=InstallPolicy)
    channel: ChannelPolicy = field(default_factory=ChannelPolicy)


def load_served(slot: ActiveSlot, root: Root, *, fleet: str, profile: DeviceProfile) -> ServedModel:
    """The model of an installed slot, loaded in the profile's runtime.

    Raises:
        ReleaseRefused: the slot's metadata no longer verifies against the root.
        ArtifactError / RuntimeUnavailableError: the runtime cannot load the model.
    """
    release = read_installed(slot.metadata, root, fleet=fleet, prototype=profile.prototype)
    runner = load_artifact(
        slot.model_path,
        runtime=release.spec.runtime,
        threads=profile.inference.threads,
        check_digest=False,
    )
    return ServedModel(runner, release)


class Deployment:
    """The slots, installer, release channel, served model and inference counters of
    one device (see the module docstring)."""

    def __init__(self, config: DeployConfig, *, publish: Publish) -> None:
        self.config = config
        self.holder = ModelHolder()
        self.stats = InferenceStats()
        self.store = SlotStore(config.state_dir, config.profile.prototype)
        self.installer = Installer(
            self.store,
            config.root,
            agent_id=config.agent_id,
            fleet=config.fleet,
            profile=config.profile,
            holder=self.holder,
            policy=config.install,
        )
        self.channel = ReleaseChannel(
            self.installer,
            agent_id=config.agent_id,
            secret=config.secret,
            fleet=config.fleet,
            publish=publish,
            policy=config.channel,
        )

    def open(self) -> ServedModel | None:
        """Recover the slots after a restart and serve the active release, if there is
        one that loads (a damaged slot falls back to the previous release)."""
        slot = self.store.open()
        if slot is None:
            log.info("%s: no release installed yet", self.config.agent_id)
            return None
        try:
            model = load_served(
                slot, self.config.root, fleet=self.config.fleet, profile=self.config.profile
            )
        except (ReleaseRefused, ValueError) as e:  # ArtifactError is a ValueError
            log.error(
                "%s: installed release %d cannot be served: %s",
                self.config.agent_id,
                slot.record.version,
                e,
            )
            return None
        self.holder.swap(model)
        log.info("%s: serving release %d", self.config.agent_id, model.version)
        return model

    def app(self, limits: RequestLimits | None = None) -> InferenceApp:
        """The inference endpoints over this deployment's model and counters."""
        return InferenceApp(self.holder, self.stats, limits=limits)

    def inference_status(self) -> InferenceStatus:
        """The block for the agent's status."""
        return self.stats.status(self.holder.version)
