"""End to end: a SuperLink and three SuperNodes as separate OS processes, talking gRPC on 127.0.0.1."""

import json

import pytest

from scripts import launch

pytestmark = pytest.mark.slow
PORTS = launch.Ports(http=8100, fleet=9192)  # apart from the defaults a user's own SuperLink may hold
CONNECTION = "test-deployment"


@pytest.fixture
def federation(tmp_path):
    """SuperLink + 3 SuperNodes; every process is stopped afterwards, also when the test fails."""
    home = tmp_path / "flwr-home"
    launch.write_connection(home, CONNECTION, PORTS.address)
    processes = [launch.start_superlink(home, PORTS, simulation=False)]
    try:
        processes += launch.start_supernodes(home, PORTS, count=3, first_runtime_port=9200)
        yield home, processes
    finally:
        launch.stop(processes)


def test_three_supernodes_run_two_rounds_with_distillation_over_grpc(federation, tmp_path):
    home, processes = federation
    out = tmp_path / "out"
    run_id = launch.flwr_run(home, CONNECTION, f'num-server-rounds=2 min-nodes=3 out-dir="{out}"', stream=False)
    assert launch.wait_finished(home, CONNECTION, run_id, timeout=300) == "finished:completed"
    rows = [json.loads(line) for line in (out / str(run_id) / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert len({c["node-id"] for c in rows[2]["clients"]}) == 3
    assert rows[2]["teacher"]["accuracy"] > rows[0]["teacher"]["accuracy"]
    assert "student" in rows[2] and (out / str(run_id) / "student.safetensors").exists()
    assert all(p.poll() is None for p in processes), "a Flower process died during the run"
