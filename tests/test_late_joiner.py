"""A SuperNode that connects while a deployed run is under way is handed a free partition and
trains from the next round, over gRPC with real processes."""

import json
import time

import pytest

from scripts import launch

pytestmark = pytest.mark.slow
PORTS = launch.Ports(http=8190, fleet=9342)  # apart from test_deployment.py's
CONNECTION = "test-late-joiner"


def start_node(home, i: int):
    """A warm SuperNode that pins no partition: the server hands it one."""
    cmd = [*launch.supernode_command("warm"), "--insecure", "--superlink", f"127.0.0.1:{PORTS.fleet}",
           "--port", str(9350 + i), "--node-config", f"model-dir=\"{home / f'models-{i}'}\""]
    return launch.start(cmd, home / f"supernode-{i}.log", launch.flower_env(home))


def activations(home) -> int:
    """How many SuperNodes the SuperLink has brought online so far (its log's ActivateNode lines)."""
    return (home / "superlink.log").read_text(errors="replace").count("[Fleet.ActivateNode] Activated")


def rounds_written(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_supernode_joining_after_round_2_gets_the_free_partition_and_trains_from_the_round_after_it_connects(tmp_path):
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    launch.write_connection(home, CONNECTION, PORTS.address)
    processes = [launch.start_superlink(home, PORTS, simulation=False)]
    try:
        processes += [start_node(home, 0), start_node(home, 1)]
        run_id = launch.flwr_run(home, CONNECTION, f'num-server-rounds=8 min-nodes=2 num-partitions=3 local-epochs=8 '
                                 f'distill="off" out-dir="{out}"', stream=False)
        metrics, deadline = out / str(run_id) / "metrics.jsonl", time.monotonic() + 240
        while len(rounds_written(metrics)) < 3:  # round 0 (the initial model), 1 and 2 done: round 3 runs
            assert time.monotonic() < deadline, "the run did not reach round 3"
            time.sleep(0.2)
        processes.append(start_node(home, 2))
        while activations(home) < 3:  # the SuperLink has the third node online
            assert time.monotonic() < deadline, "the third SuperNode never connected"
            time.sleep(0.2)
        joined_in = len(rounds_written(metrics))  # the round under way when the third node came online
        assert joined_in < 8, "the third node came online after the last round: lengthen the rounds"
        assert launch.wait_finished(home, CONNECTION, run_id, timeout=300) == "finished:completed"
        rows = rounds_written(metrics)[1:]
        partitions = {r["round"]: sorted(c["partition-id"] for c in r["clients"]) for r in rows}
        assert all(partitions[r] == [0, 1] for r in range(1, joined_in)), partitions
        late = [r for r, held in partitions.items() if held == [0, 1, 2]]  # the free partition 2, handed out
        assert late and late[0] <= joined_in + 1 and late == list(range(late[0], 9)), (joined_in, partitions)
        assert all(r["rejected"] == [] for r in rows)
    finally:
        launch.stop(processes)
