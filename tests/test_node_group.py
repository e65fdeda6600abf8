"""Several SuperNodes in one process (``fl-distill-supernode --nodes K``), their tasks from one warm parent."""

import json
import re
import threading

import pytest

from client.idle_backoff import IdleBackoff, PerThread
from client.node_group import node_args
from client.supernode import executor_command
from scripts import launch


def test_each_node_gets_its_index_in_place_of_braces_and_its_own_runtime_port():
    args = ["--superlink", "h:9092", "--port", "9094", "--node-config", "partition-id={i} num-partitions=100",
            "--auth-supernode-private-key", "keys/client-{i}.key"]
    assert node_args(args, 7, 9101) == ["--superlink", "h:9092", "--node-config", "partition-id=7 num-partitions=100",
                                        "--auth-supernode-private-key", "keys/client-7.key", "--port", "9101"]
    assert node_args(["--port=9094", "--insecure"], 0, 9094) == ["--insecure", "--port", "9094"]


def test_one_executor_serves_every_node_of_the_process():
    nodes = [["--insecure", "--port", str(9300 + k)] for k in range(3)]
    cmd = executor_command(nodes[0], supernode_pid=5, more_nodes=nodes[1:])
    addresses = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--runtime-api-address"]
    assert addresses == ["127.0.0.1:9300", "127.0.0.1:9301", "127.0.0.1:9302"]


def test_each_thread_backs_off_on_its_own_work():
    now = [0.0]
    per_thread = PerThread(lambda name: IdleBackoff(0.1, 0.8, after=10, name=name, clock=lambda: now[0]))
    started, worked, waits = threading.Barrier(2), threading.Event(), {}

    def idle_node():
        per_thread.next_wait()  # this node's backoff, made at t=0
        started.wait()
        worked.wait()  # the other node has just worked, at t=100
        waits["idle"] = [per_thread.next_wait() for _ in range(3)]

    def busy_node():
        per_thread.next_wait()
        started.wait()
        now[0] = 100.0
        per_thread.work()
        waits["busy"] = per_thread.next_wait()
        worked.set()

    threads = [threading.Thread(target=t) for t in (idle_node, busy_node)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert waits == {"idle": [0.2, 0.4, 0.8], "busy": 0.1}


def test_a_node_whose_connection_ends_connects_again_alone_and_a_configuration_exit_stops_the_process(
        monkeypatch, caplog):
    from client import node_group

    calls = []

    def flower_loop(**kwargs):  # Flower's loop for one node: ends, is refused, then meets a bad configuration
        calls.append(kwargs)
        if len(calls) == 1:
            return
        if len(calls) == 2:
            node_group._exit_from_thread(305, "the SuperLink refused to activate the node")
        node_group._exit_from_thread(303, "TLS is off but a private key is given")

    monkeypatch.setattr(node_group.supernode_loop, "start_client_internal", flower_loop)
    monkeypatch.setattr(node_group.time, "sleep", lambda _: None)
    thread = threading.Thread(target=node_group._serve, args=("supernode-3", {"node": 3}), name="supernode-3")
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and calls == [{"node": 3}] * 3
    assert "supernode-3 stopped (its connection ended); connecting it again in 1 s" in caplog.text
    assert "supernode-3 stopped (Flower's exit code 305); connecting it again in 2 s" in caplog.text
    assert node_group._fatal.get_nowait() == (303, "TLS is off but a private key is given")  # for the main thread


def test_tasks_starting_together_on_one_host_install_the_runs_fab_one_at_a_time(tmp_path, monkeypatch):
    import time

    from client.task import one_at_a_time

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    inside, seen = [0], []

    def install(fab: bytes):  # Flower's install_from_fab: mkdir, then the files moved in
        inside[0] += 1
        seen.append(inside[0])
        time.sleep(0.05)
        inside[0] -= 1
        return fab

    tasks = [threading.Thread(target=one_at_a_time(install), args=(b"fab",)) for _ in range(4)]
    for task in tasks:
        task.start()
    for task in tasks:
        task.join(timeout=10)
    assert seen == [1, 1, 1, 1]  # never two installs at once
    assert (tmp_path / "apps" / ".install.lock").exists()


@pytest.mark.slow
def test_four_supernodes_in_one_process_train_four_partitions_from_one_warm_parent(tmp_path):
    home, out, ports = tmp_path / "flwr-home", tmp_path / "out", launch.Ports(http=8770, fleet=9872)
    launch.write_connection(home, "group", ports.address)
    processes = [launch.start_superlink(home, ports, simulation=False)]
    try:
        processes.append(launch.start(
            [launch.bin_path("fl-distill-supernode"), "--nodes", "4", "--insecure", "--superlink",
             f"127.0.0.1:{ports.fleet}", "--port", "9880", "--node-config",
             f'partition-id={{i}} num-partitions=4 model-dir="{home}/models-{{i}}"'],
            home / "group.log", launch.flower_env(home)))
        run_id = launch.flwr_run(home, "group", f'num-server-rounds=2 min-nodes=4 out-dir="{out}"', stream=False)
        assert launch.wait_finished(home, "group", run_id, timeout=300) == "finished:completed"
        rows = [json.loads(line) for line in (out / str(run_id) / "metrics.jsonl").read_text().splitlines()]
        for row in rows[1:]:
            assert sorted(c["partition-id"] for c in row["clients"]) == [0, 1, 2, 3]
            assert len({c["node-id"] for c in row["clients"]}) == 4
        log = (home / "group.log").read_text()
        assert len(re.findall(r"warm parent (\d+) ready", log)) == 1  # one executor, one warm parent
        parents = set(re.findall(r"fl-distill-executor: task \d+ run \d+ train: .* parent (\d+) \(forked", log))
        assert len(parents) == 1 and len(re.findall(r"task \d+ run \d+ train: .* replied", log)) == 8
        group = processes[1]
        assert group.poll() is None, "the group's process ended during the run"
    finally:
        launch.stop(processes)
    assert all(p.poll() is not None for p in processes)
