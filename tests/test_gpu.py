"""On a GPU: local training, server distillation, the warm executor and whole runs on CUDA (marker ``gpu``).

Every ``gpu`` test needs a visible CUDA device and is skipped without one, saying so: ``pytest -m gpu`` on a
CPU machine reports each as skipped. ``scripts/gpu-check.sh`` runs them on a GPU machine (docs/gpu.md).
The last tests are the CPU machine's half: ``device="cuda"`` (or ``--client-gpus``) where no CUDA device is
visible is refused at start, naming the key, and a bad ``--client-gpus`` or a broken torch is refused saying so.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import multiprocessing
import warnings

import pytest
import torch
from flwr.app import ArrayRecord

from common.config import ConfigError, RunConfig
from common.data import client_set, server_sets
from common.models import build_student, build_teacher
from common.training import predict_logits, setup_compute, train_local
from scripts import launch
from server.distillation import ServerDistillation, ensemble_logits
from tests.conftest import default_run_config

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device is visible here (torch.cuda.is_available() is False); run scripts/gpu-check.sh on a GPU machine"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason=NO_CUDA)
SYNC_WARNING = "called a synchronizing CUDA operation"


def train_counting_syncs(config: RunConfig, device: torch.device, epochs: int) -> tuple[dict, int, torch.nn.Module]:
    """``train_local`` on partition 0 of 2 from the same initial weights and seed: (metrics, host syncs, model)."""
    data = client_set(config, 0, 2)
    torch.manual_seed(0)
    model = build_teacher(data.input_shape, data.num_classes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")  # a UserWarning at every host-device synchronisation
        try:
            metrics = train_local(model, data, epochs, config.batch_size, config.lr, device, seed=0)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    return metrics, sum(SYNC_WARNING in str(w.message) for w in caught), model


@gpu
@needs_cuda
def test_local_training_on_cuda_reaches_the_cpu_runs_loss_and_reads_nothing_back_per_batch(config):
    cpu, _, _ = train_counting_syncs(config, torch.device("cpu"), epochs=1)
    cuda, syncs_one_epoch, model = train_counting_syncs(config, torch.device("cuda"), epochs=1)
    assert next(model.parameters()).is_cuda
    # the count sees syncs at all (the model and data copied over, loss and accuracy read back): not vacuous
    assert syncs_one_epoch >= 3, syncs_one_epoch
    # the same data, initial weights and batch order: only float rounding (cuDNN's kernels) differs
    assert cuda["train-loss"] == pytest.approx(cpu["train-loss"], rel=0.03)
    assert cuda["train-accuracy"] == pytest.approx(cpu["train-accuracy"], abs=0.03)

    _, syncs_three_epochs, _ = train_counting_syncs(config, torch.device("cuda"), epochs=3)
    batches_per_epoch = math.ceil(len(client_set(config, 0, 2)) / config.batch_size)
    assert batches_per_epoch >= 20
    # two more epochs add 2 x batches_per_epoch batches but at most their two index copies to the device
    assert syncs_three_epochs - syncs_one_epoch <= 2, (syncs_one_epoch, syncs_three_epochs, batches_per_epoch)


@gpu
@needs_cuda
def test_server_distillation_on_cuda_with_the_ensemble_teacher_gives_what_the_cpu_gives(config):
    config = dataclasses.replace(config, distill="ensemble", distill_target="both", distill_steps=60)
    proxy, test = server_sets(config)
    clients = []
    for partition in range(3):
        torch.manual_seed(partition)
        model = build_teacher(proxy.input_shape, proxy.num_classes)
        train_local(model, client_set(config, partition, 3), 1, 16, 0.05, torch.device("cpu"), seed=partition)
        clients.append(("large", ArrayRecord(model.state_dict())))
    averaged = clients[0][1]

    models = [ServerDistillation(config, proxy, torch.device("cpu"))._model(f, a) for f, a in clients]
    on_cpu = ensemble_logits(models, proxy.images, torch.device("cpu"), 3.0)
    on_cuda = ensemble_logits(models, proxy.images, torch.device("cuda"), 3.0)
    assert torch.allclose(on_cpu, on_cuda, atol=1e-3)

    results = {}
    for name in ("cpu", "cuda"):
        torch.manual_seed(0)
        distillation = ServerDistillation(config, proxy, torch.device(name))
        returned, stats = distillation.run({"large": averaged}, clients)
        assert next(distillation.student.parameters()).device.type == name
        student_acc = (predict_logits(distillation.student, test.images, torch.device(name)).argmax(1)
                       == test.labels).float().mean().item()
        results[name] = (student_acc, stats)
        fused = build_teacher(proxy.input_shape, proxy.num_classes)
        fused.load_state_dict(returned["large"].to_torch_state_dict())  # the fused global model comes back on the CPU
    assert results["cuda"][1]["student"]["steps"] == results["cpu"][1]["student"]["steps"] == 60
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], abs=0.05)


def _train_on_cuda(reports) -> None:
    """A task of the warm executor's kind, forked from its warm parent: train on cuda, report where and what."""
    from client.task import parent_initialised_cuda

    inherited = parent_initialised_cuda()
    config = RunConfig.from_mapping(default_run_config())
    data = client_set(config, 0, 4)
    model = build_student(data.input_shape, data.num_classes)
    metrics = train_local(model, data, 1, 16, 0.05, setup_compute("cuda"), seed=0)
    reports.send({"parent-cuda": inherited, "device": str(next(model.parameters()).device), **metrics})


@gpu
@needs_cuda
def test_tasks_forked_from_the_warm_parent_train_on_cuda_and_the_parent_never_initialises_cuda():
    from client.executor import WarmExecutor

    executor = WarmExecutor("127.0.0.1:1", None)  # no Runtime API: the tasks here are training functions
    try:
        executor.warm_up()
        assert not executor.parent_initialised_cuda()
        for _ in range(2):  # the second after one that used the GPU: the parent stays clean
            receive, send = executor.context.Pipe(duplex=False)
            task = executor.context.Process(target=_train_on_cuda, args=(send,))
            task.start()
            send.close()
            report = receive.recv()
            task.join(timeout=120)
            assert task.exitcode == 0 and report["device"].startswith("cuda") and not report["parent-cuda"]
            assert math.isfinite(report["train-loss"])
        assert not executor.parent_initialised_cuda()
    finally:
        forkserver = multiprocessing.forkserver._forkserver  # started by this test; stop it with the test
        if hasattr(forkserver, "_stop"):
            forkserver._stop()


def metrics_rows(out, run_id) -> list[dict]:
    return [json.loads(line) for line in (out / str(run_id) / "metrics.jsonl").read_text().splitlines()]


@gpu
@pytest.mark.slow
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed: Flower's simulation engine needs it (flwr[simulation]; "
                           "scripts/gpu_wheels.py prepare --with-ray)")
def test_a_simulation_whose_virtual_clients_share_the_gpu_completes_two_rounds(tmp_path):
    home, out, connection = tmp_path / "flwr-home", tmp_path / "out", "gpu-sim"
    ports = launch.Ports(http=8730, fleet=9822)  # apart from the other tests' SuperLinks
    launch.write_connection(home, connection, ports.address)
    superlink = launch.start_superlink(home, ports, simulation=True)
    try:
        run_id = launch.flwr_run(home, connection, f'num-server-rounds=2 device="cuda" out-dir="{out}"',
                                 "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.25",
                                 stream=False)
        # 2 rounds take seconds on a GPU; a hang fails here, well within gpu-check.sh's limit for all tests
        assert launch.wait_finished(home, connection, run_id, timeout=120) == "finished:completed"
    finally:
        launch.stop([superlink])
    rows = metrics_rows(out, run_id)
    # device="cuda" fails a client without a GPU: four valid replies a round mean four clients trained on it
    assert [len(r["clients"]) for r in rows[1:]] == [4, 4]
    assert rows[2]["teacher"]["accuracy"] > rows[0]["teacher"]["accuracy"]


@gpu
@pytest.mark.slow
@needs_cuda
def test_three_warm_supernodes_on_cuda_complete_two_rounds_and_their_parents_never_touch_cuda(tmp_path):
    from tests.test_deployment import executor_tasks, federation_of

    ports, connection = launch.Ports(http=8740, fleet=9832), "gpu-deploy"
    cuda_nodes = {i: 'device="cuda"' for i in range(3)}
    with federation_of(tmp_path, connection, ports, 3, 9840, node_configs=cuda_nodes) as (home, processes):
        out = tmp_path / "out"
        run_id = launch.flwr_run(home, connection, f'num-server-rounds=2 min-nodes=3 device="cuda" out-dir="{out}"',
                                 stream=False)
        assert launch.wait_finished(home, connection, run_id, timeout=120) == "finished:completed"
        assert all(p.poll() is None for p in processes), "a Flower process died during the run"
        rows = metrics_rows(out, run_id)
        assert [len(r["clients"]) for r in rows[1:]] == [3, 3]
        for node in range(3):
            tasks = [t for t in executor_tasks(home, node) if t["run"] == str(run_id)]
            assert tasks and all(t["exit"] == "0" and t["reply"] == "replied" for t in tasks)
            log = (home / f"supernode-{node}.log").read_text()
            assert "HAD INITIALISED CUDA" not in log and "CUDA untouched" in log


# The CPU machine's half: no CUDA device, so device="cuda" is refused before anything runs.
no_cuda_here = pytest.mark.skipif(CUDA, reason="a CUDA device is visible here: the refusal cannot happen")


@no_cuda_here
def test_device_cuda_is_refused_at_start_naming_the_key_where_no_cuda_device_is_visible():
    with pytest.raises(ConfigError, match=r"device = 'cuda' but no CUDA device is visible here"):
        setup_compute("cuda")  # the ServerApp's first step, and every ClientApp task's


@no_cuda_here
def test_simulate_refuses_device_cuda_before_starting_flower(capsys):
    from scripts import simulate

    with pytest.raises(SystemExit) as exit_info:
        simulate.parse_args(["--run-config", 'device="cuda"'])
    assert exit_info.value.code == 2
    assert "device = 'cuda' but no CUDA device is visible here" in capsys.readouterr().err


@no_cuda_here
def test_a_supernode_whose_node_config_asks_for_cuda_exits_at_start_saying_none_is_visible():
    from client.supernode import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--node-config", 'device="cuda"', "--insecure", "--superlink", "127.0.0.1:1"])
    assert "node config device = 'cuda' but no CUDA device is visible here" in str(exit_info.value.code)


@no_cuda_here
def test_client_gpus_needs_a_gpu_here_unless_the_clients_run_on_a_ray_cluster(capsys):
    from scripts import simulate

    with pytest.raises(SystemExit):
        simulate.parse_args(["--client-gpus", "0.25"])
    assert "--client-gpus = 0.25 needs a GPU, but no CUDA device is visible here" in capsys.readouterr().err
    args, config = simulate.parse_args(["--client-gpus", "0.25", "--ray-address", "10.0.0.5:6379"])
    assert args.client_gpus == 0.25 and config.device == "auto"  # the cluster's GPUs; the server falls back here


@pytest.mark.parametrize("share", ["2", "-1", "nan"])
def test_client_gpus_outside_a_share_of_one_gpu_is_refused(capsys, share):
    from scripts import simulate

    with pytest.raises(SystemExit) as exit_info:
        simulate.parse_args(["--client-gpus", share])
    assert exit_info.value.code == 2 and "use a share of one GPU, 0 to 1" in capsys.readouterr().err


def test_a_supernode_whose_torch_fails_says_so_rather_than_that_no_gpu_is_visible(monkeypatch):
    from client import supernode

    monkeypatch.setattr(supernode, "CUDA_PROBE", "import sys; sys.exit('ImportError: libcudart.so.13: cannot open')")
    with pytest.raises(SystemExit) as exit_info:
        supernode.check_cuda_visible({"device": "cuda"})
    message = str(exit_info.value.code)
    assert "failed: ImportError: libcudart.so.13" in message and "no CUDA device is visible" not in message
