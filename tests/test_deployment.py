"""End to end: a SuperLink and SuperNodes as separate OS processes, talking gRPC on 127.0.0.1,
each SuperNode with the warm ClientApp executor beside it (``fl-distill-supernode``)."""

import contextlib
import json
import os
import re
import shutil
import signal
import time

import pytest
import torch

from scripts import launch

pytestmark = pytest.mark.slow
PORTS = launch.Ports(http=8100, fleet=9192)  # apart from the defaults a user's own SuperLink may hold
CONNECTION = "test-deployment"
TASK_LINE = re.compile(
    r"fl-distill-executor: task \d+ run (\d+) ([\w.]+): [\d.]+ s, exit (-?\d+), (replied|NO REPLY), pid (\d+), parent (\d+)")


@contextlib.contextmanager
def federation_of(folder, connection: str, ports: launch.Ports, count: int, first_runtime_port: int,
                  superlink_args: tuple[str, ...] = (), node_configs: dict[int, str] | None = None):
    """A SuperLink + ``count`` warm SuperNodes; every process is stopped afterwards, also when a test fails.

    The list it yields is the one stopped at the end: a test that replaces a process appends the new one.
    """
    home = folder / "flwr-home"
    launch.write_connection(home, connection, ports.address)
    processes = [launch.start_superlink(home, ports, simulation=False, extra=list(superlink_args))]
    try:
        processes += launch.start_supernodes(home, ports, count=count, first_runtime_port=first_runtime_port,
                                             executor="warm", node_configs=node_configs)
        yield home, processes
    finally:
        launch.stop(processes)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """The shared federation of this module's run tests: 3 warm SuperNodes."""
    with federation_of(tmp_path_factory.mktemp("shared"), CONNECTION, PORTS, 3, 9200) as running:
        yield running


def executor_tasks(home, node: int) -> list[dict]:
    """The task lines the warm executor of SuperNode ``node`` logged."""
    log = (home / f"supernode-{node}.log").read_text()
    return [dict(zip(("run", "type", "exit", "reply", "pid", "parent"), m.groups())) for m in TASK_LINE.finditer(log)]


def warm_parent(home, node: int) -> int:
    """The PID of the warm parent that SuperNode ``node``'s executor started last."""
    parents = re.findall(r"warm parent (\d+) ready", (home / f"supernode-{node}.log").read_text())
    assert parents, f"SuperNode {node}'s executor never got warm"
    return int(parents[-1])


def completed_run(home, run_config: str, **flwr_run_args) -> int:
    """`flwr run` on the shared federation; the run's ID, once it has finished as completed."""
    run_id = launch.flwr_run(home, CONNECTION, run_config, stream=False, **flwr_run_args)
    assert launch.wait_finished(home, CONNECTION, run_id, timeout=300) == "finished:completed"
    return run_id


def metrics(out, run_id) -> list[dict]:
    return [json.loads(line) for line in (out / str(run_id) / "metrics.jsonl").read_text().splitlines()]


def test_three_warm_supernodes_run_two_rounds_with_distillation_over_grpc(federation, tmp_path):
    home, processes = federation
    out = tmp_path / "out"
    run_id = completed_run(home, f'num-server-rounds=2 min-nodes=3 out-dir="{out}"')
    rows = metrics(out, run_id)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert len({c["node-id"] for c in rows[2]["clients"]}) == 3
    assert rows[2]["teacher"]["accuracy"] > rows[0]["teacher"]["accuracy"]
    assert "student" in rows[2] and (out / str(run_id) / "student.safetensors").exists()
    assert all(p.poll() is None for p in processes), "a Flower process died during the run"

    # One message per round, and its reply carries the clients' evaluation of the model they received.
    for row in rows[1:]:
        assert all({"eval-loss", "eval-accuracy", "train-loss", "num-examples"} <= set(c) for c in row["clients"])
    assert rows[2]["client-metrics"]["eval-accuracy"] > rows[1]["client-metrics"]["eval-accuracy"]

    # Every ClientApp task ran in a child of that node's warm parent, itself a child of the SuperNode.
    for node, supernode in enumerate(processes[1:]):
        parent = warm_parent(home, node)
        assert parent in launch.process_tree(supernode.pid)
        tasks = [t for t in executor_tasks(home, node) if t["run"] == str(run_id)]
        assert [t["type"] for t in tasks] == ["train", "train", "query.deliver"]  # the student, at the end
        assert all(t["exit"] == "0" and t["reply"] == "replied" and int(t["parent"]) == parent for t in tasks)


def test_the_student_is_installed_on_every_supernode_and_predicts_there(federation, tmp_path):
    """deliver='both' over gRPC: each node's model-dir holds what the server sent; fl-distill-predict runs on it."""
    import subprocess

    import numpy as np
    from PIL import Image

    from common.model_package import verify

    home, _ = federation
    out = tmp_path / "out"
    run_id = completed_run(home, f'num-server-rounds=1 min-nodes=3 deliver="both" out-dir="{out}"')
    rows = json.loads((out / str(run_id) / "devices.json").read_text())
    assert sorted(row["partition"] for row in rows) == [0, 1, 2]
    for row in rows:
        assert row["status"] == "installed", row["error"]
        folder = home / f"models-{row['partition']}" / "current"  # launch.py gives node i models-<i>
        manifest = verify(folder)
        assert manifest["run-id"] == run_id and set(manifest["models"]) == {"student", "student-int8", "global"}
        assert all(0 <= m["accuracy"] <= 1 and m["latency-ms-b1"] > 0 for m in row["models"].values())
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((8, 8)) * 255).astype(np.uint8), "L").save(images / f"{i}.png")
    (images / "cut.png").write_bytes((images / "0.png").read_bytes()[:30])
    done = subprocess.run([launch.bin_path("fl-distill-predict"), "--model-dir", str(home / "models-0"), str(images)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [line.split(":")[0].rsplit("/", 1)[1] for line in done.stdout.splitlines()] == ["0.png", "1.png", "2.png"]
    assert "cut.png" in done.stderr


@contextlib.contextmanager
def read_only(folder):
    """No process may write in ``folder`` inside the block: its mode for a user, the immutable flag for root
    (who ignores modes). Skips where neither works (root without CAP_LINUX_IMMUTABLE)."""
    import subprocess

    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: no way here to make a folder read-only to a SuperNode")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_node_that_cannot_write_its_model_dir_is_listed_with_the_cause_and_keeps_its_model(federation, tmp_path):
    """A read-only model-dir on one node: that node replies why, its installed model stays, the run completes."""
    from common.model_package import describe_files, install, verify

    home, _ = federation
    folder = home / "models-2"
    before = {"model.bin": b"the model this node had"}
    install(folder, before, {"version": "before", "files": describe_files(before)})
    out = tmp_path / "out"
    with read_only(folder):
        run_id = completed_run(home, f'num-server-rounds=1 min-nodes=3 out-dir="{out}"')
    rows = {row["partition"]: row for row in json.loads((out / str(run_id) / "devices.json").read_text())}
    assert rows[0]["status"] == rows[1]["status"] == "installed", rows
    assert rows[2]["status"] == "failed" and f"cannot write the model folder {folder}" in rows[2]["error"]
    assert verify(folder / "current")["version"] == "before"  # nothing half-written replaced it
    summary = json.loads((out / str(run_id) / "summary.json").read_text())
    assert (summary["delivered-to"], summary["nodes"]) == (2, 3)


def test_local_dp_runs_in_every_deployed_clientapp_and_the_server_accounts_for_it(federation, tmp_path):
    home, _ = federation
    out = tmp_path / "out"
    run_id = completed_run(home, f'num-server-rounds=1 min-nodes=3 dp="local" distill="ensemble" distill-steps=20 '
                           f'out-dir="{out}"')
    privacy = metrics(out, run_id)[1]["privacy"]
    assert privacy["mechanism"] == "local" and privacy["releases"] == 1 and 0 < privacy["epsilon"] < float("inf")
    for node in range(3):  # the mod comes with the FAB and runs in each node's warm executor
        assert "LocalDpMod: local DP noise" in (home / f"supernode-{node}.log").read_text()


def test_a_sampled_round_asks_each_supernode_once_for_its_pinned_partition_over_grpc(federation, tmp_path):
    # FedDF with the clients' fusion check: its evaluate messages go over gRPC to the nodes that did not train
    home, _ = federation
    out = tmp_path / "out"
    run_id = completed_run(home, f'num-server-rounds=2 min-nodes=1 fraction-train=0.5 distill="ensemble" '
                           f'distill-target="global" distill-steps=20 out-dir="{out}"')
    trained_on, checked_on = set(), set()  # launch.py pins partition-id = i on SuperNode i
    for node in range(3):
        tasks = [t for t in executor_tasks(home, node) if t["run"] == str(run_id)]
        assert [t["type"] for t in tasks][:1] == ["query"] and [t["type"] for t in tasks].count("query") == 1
        assert all(t["reply"] == "replied" for t in tasks)
        if "train" in (t["type"] for t in tasks):
            trained_on.add(node)
        if "evaluate" in (t["type"] for t in tasks):
            checked_on.add(node)
    rows = metrics(out, run_id)
    assert [len(r["clients"]) for r in rows[1:]] == [1, 1]  # int(3 * 0.5) = 1 node per round
    # fusion-check-nodes = "idle": the 2 nodes that sat each round out score its candidates
    assert [(r["fusion"]["by"], r["fusion"]["answered"]) for r in rows[1:]] == [("clients", 2), ("clients", 2)]
    trained_twice = trained_on if len(trained_on) == 1 else set()
    assert checked_on == {0, 1, 2} - trained_twice
    state = torch.load(out / str(run_id) / "resume.pt", weights_only=False)["partitions"]["partition-of"]
    assert sorted(state.values()) == [0, 1, 2]
    assert {state[str(c["node-id"])] for r in rows[1:] for c in r["clients"]} == trained_on


def test_a_changed_app_runs_its_own_code_on_the_same_warm_executor(federation, tmp_path):
    """A second FAB (the app with one more client metric) and the evaluate phase turned on."""
    home, _ = federation
    app = tmp_path / "app-v2"
    for part in ("client", "common", "server"):
        shutil.copytree(launch.REPO / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(launch.REPO / "pyproject.toml", app / "pyproject.toml")
    client_app = app / "client" / "client_app.py"
    source = client_app.read_text()
    marker = '    metrics.update({"num-examples": len(data),'
    assert marker in source
    client_app.write_text(source.replace(marker, '    metrics["app-version"] = 2.0\n' + marker))

    runs = {}
    for name, app_dir in (("v1", launch.REPO), ("v2", app)):
        out = tmp_path / name
        run_id = completed_run(home, f'num-server-rounds=1 min-nodes=3 fraction-evaluate=1.0 out-dir="{out}"',
                               app=app_dir)
        runs[name] = (run_id, metrics(out, run_id)[1]["clients"])

    assert all("app-version" not in c for c in runs["v1"][1])
    assert all(c["app-version"] == 2.0 for c in runs["v2"][1])
    for node in range(3):
        parent = warm_parent(home, node)
        for run_id, _ in runs.values():
            tasks = [t for t in executor_tasks(home, node) if t["run"] == str(run_id)]
            assert sorted(t["type"] for t in tasks) == ["evaluate", "query.deliver", "train"]  # evaluate still works
            assert all(int(t["parent"]) == parent for t in tasks)


def test_an_executor_killed_mid_task_is_restarted_and_the_task_and_run_still_finish(tmp_path):
    """Then killing the SuperNode stops everything it started: no orphan is left."""
    with federation_of(tmp_path, "kill-test", launch.Ports(http=8120, fleet=9232), 1, 9240) as (home, processes):
        supernode, out = processes[1], tmp_path / "out"
        run_id = launch.flwr_run(home, "kill-test", f'num-server-rounds=2 min-nodes=1 local-epochs=15 round-timeout=240 '
                                 f'out-dir="{out}"', stream=False)
        deadline = time.monotonic() + 240
        while not (tasks := task_processes(home, supernode.pid)):  # a ClientApp task is running
            assert time.monotonic() < deadline, "no ClientApp task started within 240 s"
            time.sleep(0.2)
        executor = executor_pid(supernode.pid)
        os.kill(executor, signal.SIGKILL)

        assert launch.wait_finished(home, "kill-test", run_id, timeout=240) == "finished:completed"
        rows = metrics(out, run_id)
        assert [len(r["clients"]) for r in rows[1:]] == [1, 1] and rows[1]["failures"] == 0  # the task went on
        assert max(r["round-seconds"] for r in rows[1:]) < 120  # no round waited for its timeout
        assert (home / "supernode-0.log").read_text().count("ready in") == 2  # the executor came back
        assert executor_pid(supernode.pid) != executor and not _alive(executor) and not any(map(_alive, tasks))

        tree = launch.process_tree(supernode.pid)
        assert warm_parent(home, 0) in tree and len(tree) >= 3  # SuperNode, executor, warm parent (+ tracker)
        os.kill(supernode.pid, signal.SIGKILL)
        supernode.wait()
        deadline = time.monotonic() + 15
        while alive := [pid for pid in tree if _alive(pid)]:
            assert time.monotonic() < deadline, f"left running 15 s after the SuperNode was killed: {alive}"
            time.sleep(0.2)


def task_processes(home, supernode_pid: int) -> list[int]:
    """PIDs of ClientApp tasks running now: children of the SuperNode's current warm parent."""
    if "ready in" not in (home / "supernode-0.log").read_text():
        return []
    parent = warm_parent(home, 0)
    return [pid for pid in launch.process_tree(parent) if pid != parent and _alive(pid)]


def executor_pid(supernode_pid: int) -> int:
    """The PID of the SuperNode's warm executor (``python -m client.executor``)."""
    for pid in launch.process_tree(supernode_pid):
        try:
            if b"client.executor" in open(f"/proc/{pid}/cmdline", "rb").read() and _alive(pid):
                return pid
        except OSError:
            pass
    raise AssertionError(f"no executor under SuperNode {supernode_pid}")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_supernode_killed_mid_run_costs_a_bounded_wait_and_the_run_finishes(tmp_path):
    """min-nodes=3 and one of 3 SuperNodes SIGKILLed after round 1: Flower's sampling would wait forever."""
    with federation_of(tmp_path, "dropout-test", launch.Ports(http=8140, fleet=9262), 3, 9270) as (home, processes):
        out = tmp_path / "out"
        run_id = launch.flwr_run(home, "dropout-test", f'num-server-rounds=3 min-nodes=3 node-wait-timeout=5 '
                                 f'round-timeout=120 out-dir="{out}"', stream=False)
        metrics_file = out / str(run_id) / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < 2:  # round 1 done
            assert time.monotonic() < deadline, "round 1 did not finish within 300 s"
            time.sleep(0.2)
        killed_at = time.monotonic()
        os.kill(processes[3].pid, signal.SIGKILL)

        assert launch.wait_finished(home, "dropout-test", run_id, timeout=300) == "finished:completed"
        assert time.monotonic() - killed_at < 200  # heartbeat expiry (<= 60 s) + node-wait-timeout + compute
        rows = metrics(out, run_id)
        assert [r["round"] for r in rows] == [0, 1, 2, 3]
        assert len(rows[1]["clients"]) == 3 and len(rows[3]["clients"]) == 2  # the last round went on without it
        assert rows[3]["teacher"]["accuracy"] >= rows[1]["teacher"]["accuracy"]


def test_a_run_whose_superlink_was_killed_is_resumed_from_its_checkpoint(tmp_path):
    """SIGKILL the SuperLink (and the ServerApp with it) after round 2 of 4, restart it on its database, resume."""
    ports = launch.Ports(http=8160, fleet=9282)
    state = tmp_path / "superlink.db"
    with federation_of(tmp_path, "restart-test", ports, 3, 9290, ("--database", str(state))) as (home, processes):
        out = tmp_path / "out"
        settings = f'num-server-rounds=4 distill-steps=20 round-timeout=120 out-dir="{out}"'
        run_id = launch.flwr_run(home, "restart-test", settings, stream=False)
        metrics_file = out / str(run_id) / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < 3:  # round 2 done
            assert time.monotonic() < deadline, "round 2 did not finish within 300 s"
            time.sleep(0.2)
        time.sleep(0.5)  # resume.pt follows the metrics line
        launch.crash(processes[0])
        processes.append(launch.start_superlink(home, ports, simulation=False, extra=["--database", str(state)]))

        restarted = time.monotonic()
        resumed_id = launch.flwr_run(home, "restart-test", f'{settings} resume-from="{out / str(run_id)}"',
                                     stream=False)
        assert launch.wait_finished(home, "restart-test", resumed_id, timeout=400) == "finished:completed"
        rows = metrics(out, run_id)
        assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # the interrupted run's folder, continued
        assert len(rows[4]["clients"]) == 3  # the SuperNodes rejoined the restarted SuperLink by themselves
        assert rows[4]["teacher"]["accuracy"] >= rows[2]["teacher"]["accuracy"] - 0.02
        assert json.loads((out / str(run_id) / "summary.json").read_text())["resumed-after-round"] >= 2
        assert time.monotonic() - restarted < 300


def test_a_supernode_declaring_the_small_model_trains_and_receives_the_small_familys_model(tmp_path):
    # a weak device joins with model="small": it gets, trains and returns the small CNN's shapes over gRPC,
    # and the model delivered to it at the end is its own family's
    out = tmp_path / "out"
    with federation_of(tmp_path, "families-test", launch.Ports(http=8170, fleet=9302), 3, 9310,
                       node_configs={2: 'model="small"'}) as (home, _):
        lines: list[str] = []
        run_id = launch.flwr_run(home, "families-test", f'num-server-rounds=1 min-nodes=3 model-families="large,small" '
                                 f'deliver="global" out-dir="{out}"', echo=lines.append)
        assert launch.wait_finished(home, "families-test", run_id, timeout=300) == "finished:completed", \
            "\n".join(lines)
    last = metrics(out, run_id)[-1]
    assert last["families"]["small"]["valid"] == 1 and last["families"]["large"]["valid"] == 2
    assert last["rejected"] == []
    assert last["families"]["small"]["bytes-received"] < last["families"]["large"]["bytes-received"] / 8
    (small_node,) = [c for c in last["clients"] if c["model-family"] == "small"]
    assert small_node["node-id"] in last["families"]["small"]["heard-from"]
    delivered = torch.jit.load(str(next((home / "models-2").rglob("global.pt"))))
    first_layer = dict(delivered.named_parameters())["features.0.weight"]
    assert first_layer.shape[0] == 32  # the small CNN's first layer, not the large one's 64
    manifest = json.loads(next((home / "models-2").rglob("manifest.json")).read_text())
    assert manifest["models"]["global"]["model-family"] == "small"  # the node's files say which family it holds
