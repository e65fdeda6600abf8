"""Simulation past one host: the app's virtual clients on a two-node Ray cluster (docs/deployment.md).

Both Ray nodes run on 127.0.0.1, each started as on its own machine (``ray start --head`` and
``ray start --address``, one CPU each); the SuperLink joins through ``RAY_ADDRESS``, as
``python -m scripts.simulate --ray-address`` does. Ray's state API (served by the head's
dashboard: ``ray[default]``, the ``cluster`` extra) says where each ClientApp actor ran.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from scripts import launch

pytestmark = pytest.mark.slow
CONNECTION = "test-ray"
PORTS = launch.Ports(http=8800, fleet=9892)
GCS_PORT, DASHBOARD_PORT = 6391, 8865
DASHBOARD = f"http://127.0.0.1:{DASHBOARD_PORT}"


def wait_for(what: str, check, processes, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dead := [p.args[:3] for p in processes if p.poll() is not None]:
            raise RuntimeError(f"{dead} exited while waiting for {what}")
        try:
            if result := check():
                return result
        except Exception:  # not up yet
            pass
        time.sleep(1)
    raise TimeoutError(f"no {what} within {timeout:g} s")


@pytest.fixture
def ray_cluster(tmp_path):
    """The cluster's two node IDs; both nodes stopped afterwards, whatever happens."""
    from ray.util.state import list_nodes

    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # not tmp_path: Ray's socket paths must stay short
    processes = []
    try:
        processes.append(launch.start_ray_node(tmp_path / "ray-head.log", temp_dir, GCS_PORT, head=True, num_cpus=1,
                                               dashboard_port=DASHBOARD_PORT))
        wait_for("dashboard", lambda: urllib.request.urlopen(f"{DASHBOARD}/api/version", timeout=2), processes)
        processes.append(launch.start_ray_node(tmp_path / "ray-worker.log", temp_dir, GCS_PORT, head=False, num_cpus=1))
        alive = lambda: [n.node_id for n in list_nodes(address=DASHBOARD) if n.state == "ALIVE"]
        yield wait_for("two alive Ray nodes", lambda: len(ids := alive()) == 2 and ids, processes)
    finally:
        launch.stop(processes)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_simulation_on_a_two_node_ray_cluster_runs_client_apps_on_both_nodes(ray_cluster, tmp_path):
    from ray.util.state import list_tasks

    home = tmp_path / "flwr-home"
    launch.write_connection(home, CONNECTION, PORTS.address)
    superlink = launch.start_superlink(home, PORTS, simulation=True, ray_address=f"127.0.0.1:{GCS_PORT}")
    try:
        run_id = launch.flwr_run(home, CONNECTION, f'num-server-rounds=2 local-epochs=1 distill="off" '
                                 f'out-dir="{tmp_path / "out"}"', "num-supernodes=4 client-resources-num-cpus=1",
                                 echo=lambda _: None)
        status = launch.wait_finished(home, CONNECTION, run_id, timeout=120)
    finally:
        launch.stop([superlink])
    assert status == "finished:completed", (home / "superlink.log").read_text()[-3000:]

    runs = list_tasks(address=DASHBOARD, filters=[("name", "=", "ClientAppActor.run")], limit=1000, detail=True)
    finished = {}
    for task in runs:
        if task.state == "FINISHED":
            finished[task.node_id] = finished.get(task.node_id, 0) + 1
    # 4 virtual clients x 2 rounds of train (each node asked once) ran as actor tasks, on both nodes.
    assert set(finished) == set(ray_cluster), f"ClientApp runs per Ray node: {finished}, nodes {ray_cluster}"
    assert sum(finished.values()) >= 8
