"""Agents behind a site broker: two real Mosquitto processes, the site one bridged to the
central one, a coordinator on the central broker and agent processes on the site broker.
The federation completes, the central broker sees one connection for the whole site, and
restarting the site broker in the middle of a round loses no update."""

from __future__ import annotations

import getpass
import re

import pytest

from coordinator.broker.mosquitto import MosquittoProcess
from coordinator.broker.net import free_port
from coordinator.broker.site import SiteSpec
from coordinator.serve import provision, provision_sites
from coordinator.testbed import Federation, metrics, read_state, small_federation, wait_until
from takfl.config import load_federation
from tests.brokers import MOSQUITTO_MISSING

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        MOSQUITTO_MISSING,
        reason="mosquitto is not installed (apt-get install mosquitto); .ci/install installs it",
    ),
]
AGENTS = ("S-000", "S-001", "M-000", "M-001", "L-000")


def test_bridged_site_federation_survives_a_site_broker_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg_path = small_federation(tmp_path, rounds=2)
    cfg = load_federation(cfg_path)
    work = tmp_path / "fed"
    central_port, site_port = free_port(), free_port()
    user = getpass.getuser()
    _, central_files, _ = provision(cfg, work, mosquitto_port=central_port, mosquitto_user=user)
    assert central_files is not None
    (site,) = provision_sites(
        cfg,
        work,
        central_files,
        [SiteSpec.parse("lab")],
        central_host="127.0.0.1",
        port=site_port,
        host="127.0.0.1",
        run_as=user,
    )
    assert sorted(site.agents) == sorted(AGENTS)
    # the agents know only their site broker
    fed = Federation(
        cfg_path=cfg_path,
        cfg=cfg,
        work=work,
        broker_url_agents=f"mqtt://127.0.0.1:{site_port}",
        broker_url_coordinator=f"mqtt://takfl-coordinator@127.0.0.1:{central_port}",
        port=central_port,
        service_port=central_files.service_port or central_port,
    )
    fed.mosquitto = MosquittoProcess(central_files).start()
    site_broker = MosquittoProcess(site.broker).start()
    try:
        fed.start_all_agents()
        coord = fed.start_coordinator("--deadline", "180", "--wait-all", "300")
        pending = fed.run_dir / "pending" / "round-1"

        def round_one_half_in() -> bool:
            assert coord.poll() is None, fed.logs()
            return (
                read_state(fed.run_dir).get("open_round", {}) is not None
                and len(list(pending.glob("*.safetensors"))) >= 1
            )

        wait_until(round_one_half_in, 400, "the first update of round 1")
        # mid-round: some updates are in, others in flight or still training
        site_broker.stop()
        site_broker.start()
        assert coord.wait(900) == 0, fed.logs()
        served = metrics(fed.run_dir)
        assert read_state(fed.run_dir)["phase"] == "finished"
        assert {(r["round"], r["prototype"]) for r in served} == {
            (r, p) for r in (1, 2) for p in ("S", "M", "L")
        }
        assert all(r["clients"] == r["sampled"] for r in served), served  # nothing lost
        central_log = central_files.log.read_text()
        clients = set(re.findall(r"New (?:client|bridge) connected from \S+ as (\S+)", central_log))
        assert clients == {"takfl-coordinator", site.bridge_user}, central_log
    finally:
        site_broker.stop()
        fed.close()
