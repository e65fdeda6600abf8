"""What a GPU gives a client and the server, each measured beside a plain PyTorch loop on the same device.

    python -m bench.gpu [--device auto|cpu|cuda] [--datasets digits,mnist-5k] [--trials 3]
                        [--rounds 2] [--json PATH] [--smoke]

In one invocation, on ``--device`` (``auto``: CUDA when visible):

1. **Local training**, images per second: the ClientApp's train handler (``client/client_app.py``, which
   calls ``common.training.train_local``; timed by its own ``train-seconds``) against a plain loop of the
   same SGD steps over the same model, data, batch size and seed, with the client's data kept on the device
   (what ``train_local`` does), and the same plain loop copying each batch from host memory instead (what
   it did before: the difference is what keeping the data there buys). Target: handler / plain >= 0.9.
2. **Server distillation**, steps per second: ``server.distillation.Distiller.distill_round`` (the student
   on the round's teacher logits) against a plain loop of the same Adam steps.
3. **One deployed round**, seconds: 3 warm SuperNodes and a SuperLink as processes (``bench.round_overhead``),
   ``--rounds`` rounds with ``device="cpu"`` and, where a GPU is visible, ``device="cuda"`` (server and
   clients); the median round wall time, the slowest client's training and the distillation.

Each timed pair alternates over ``--trials`` trials after one warm-up; medians are printed. ``--json``
writes every figure (with the GPU's name, torch's version and the CUDA version), after each part.
``--smoke`` is a seconds-long run of parts 1 and 2 (digits, a quarter of the pool, one trial, one epoch,
20 steps, no deployment) that checks the benchmark works.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.config import ConfigError, RunConfig
from common.data import client_set, server_sets
from common.models import build_student, build_teacher
from common.training import predict_logits, setup_compute
from server.distillation import DistillSettings, Distiller, distillation_loss
from tests.conftest import default_run_config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_training(model, images, labels, epochs: int, batch_size: int, lr: float, device: torch.device,
                   seed: int, copy_each_batch: bool) -> float:
    """Seconds for ``epochs`` of textbook SGD with momentum; the data on ``device`` up front, or each batch
    copied there from host memory when ``copy_each_batch``."""
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    sync(device)
    started = time.perf_counter()
    if not copy_each_batch:
        images, labels = images.to(device), labels.to(device)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        order = order if copy_each_batch else order.to(device)
        for start in range(0, len(labels), batch_size):
            idx = order[start:start + batch_size]
            x, y = images[idx], labels[idx]
            if copy_each_batch:
                x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    sync(device)
    return time.perf_counter() - started


def handler_training(raw_config: dict, device: torch.device, partitions: int) -> tuple[float, int]:
    """(train-seconds, images trained) of one call of the ClientApp's train handler on partition 0 of
    ``partitions`` (1: the whole pool)."""
    from client.client_app import train

    config = RunConfig.from_mapping(raw_config)
    data = client_set(config, 0, partitions)
    torch.manual_seed(0)
    model = build_teacher(data.input_shape, data.num_classes)
    request = Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                          "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=7, message_type="train")
    node_config = {"partition-id": 0, "num-partitions": partitions, "device": device.type}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=raw_config)
    metrics = train(request, context).content["metrics"]
    return metrics["train-seconds"], config.local_epochs * len(data)


def local_training(raw_config: dict, device: torch.device, trials: int, partitions: int = 1) -> dict:
    """Images per second: the ClientApp's handler, the plain loop with the data on the device, and with a
    copy of each batch; medians over ``trials`` after a warm-up, on partition 0 of ``partitions``."""
    config = RunConfig.from_mapping(raw_config)
    data = client_set(config, 0, partitions)
    images = config.local_epochs * len(data)
    runs: dict[str, list[float]] = {"clientapp": [], "plain": [], "plain, batch copied": []}

    def plain(copy_each_batch: bool) -> float:
        torch.manual_seed(0)
        model = build_teacher(data.input_shape, data.num_classes)
        return plain_training(model, data.images, data.labels, config.local_epochs, config.batch_size, config.lr,
                              device, config.seed, copy_each_batch)

    handler_training(raw_config, device, partitions), plain(False)  # warm-up: CUDA context, kernels, allocator
    for _ in range(trials):
        runs["clientapp"].append(handler_training(raw_config, device, partitions)[0])
        runs["plain"].append(plain(False))
        runs["plain, batch copied"].append(plain(True))
    rates = {name: images / statistics.median(seconds) for name, seconds in runs.items()}
    return {"images": images, "examples": len(data), "batch-size": config.batch_size,
            "images-per-second": rates, "clientapp/plain": rates["clientapp"] / rates["plain"],
            "device-resident/batch-copied": rates["plain"] / rates["plain, batch copied"]}


def distillation_steps(raw_config: dict, device: torch.device, trials: int) -> dict:
    """Steps per second: ``Distiller.distill_round`` against a plain loop of the same Adam steps; medians."""
    config = RunConfig.from_mapping(raw_config)
    proxy, _ = server_sets(config)
    torch.manual_seed(0)
    teacher = build_teacher(proxy.input_shape, proxy.num_classes)
    logits = predict_logits(teacher, proxy.images, device)
    settings = DistillSettings(config.distill_steps, config.distill_batch_size, config.distill_temperature,
                               1.0, config.distill_lr)

    def ours() -> float:
        torch.manual_seed(0)
        distiller = Distiller(build_student(proxy.input_shape, proxy.num_classes), proxy, settings, device,
                              use_labels=False, seed=config.seed)
        sync(device)
        return distiller.distill_round(logits)["seconds"]

    def plain() -> float:
        torch.manual_seed(0)
        student = build_student(proxy.input_shape, proxy.num_classes).to(device).train()
        optimizer = torch.optim.Adam(student.parameters(), lr=settings.lr)
        sync(device)
        started = time.perf_counter()
        images, targets = proxy.images.to(device), logits.to(device)
        for _ in range(settings.steps):
            idx = torch.randint(len(images), (settings.batch_size,), device=device)
            optimizer.zero_grad()
            distillation_loss(student(images[idx]), targets[idx], settings.temperature).backward()
            optimizer.step()
        sync(device)
        return time.perf_counter() - started

    ours(), plain()  # warm-up
    runs: dict[str, list[float]] = {"distiller": [], "plain": []}
    for _ in range(trials):
        runs["distiller"].append(ours())
        runs["plain"].append(plain())
    rates = {name: settings.steps / statistics.median(seconds) for name, seconds in runs.items()}
    return {"steps": settings.steps, "batch-size": settings.batch_size, "proxy-images": len(proxy),
            "steps-per-second": rates, "distiller/plain": rates["distiller"] / rates["plain"]}


def deployed_rounds(dataset: str, devices: list[str], rounds: int) -> dict:
    """{device: median round figures} of a 3-SuperNode warm deployment on each device, one after the other."""
    from bench.round_overhead import client_compute, run

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in devices:
            folder = Path(tmp) / name
            rows, _, _ = run(folder / "flwr-home", folder / "out", 3, rounds, "warm",
                             f'dataset="{dataset}" device="{name}" deliver="none"')
            figures[name] = {"round-seconds": statistics.median(r["round-seconds"] for r in rows[1:]),
                             "client-seconds": statistics.median(client_compute(r) for r in rows[1:]),
                             "distill-seconds": statistics.median(r["distill"]["seconds"] for r in rows[1:]),
                             "accuracy": rows[-1]["teacher"]["accuracy"]}
    return figures


def describe(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def save(path: Path | None, figures: dict) -> None:
    """Write the figures so far to ``path`` (``--json``): after each part, so a run stopped by a time limit
    (``scripts/gpu-check.sh``) keeps what it measured."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--datasets", default="digits,mnist-5k", help="comma-separated (digits, mnist-5k)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="deployed rounds per device (0: skip part 3)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: digits, a quarter of the pool, one trial and epoch, 20 steps, no deployment")
    args = parser.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    if not datasets or set(datasets) - {"digits", "mnist-5k"}:
        parser.error(f"--datasets = {args.datasets!r} is not allowed; use digits and/or mnist-5k, comma-separated")
    if args.trials < 1 or args.rounds < 0:
        parser.error(f"--trials {args.trials} --rounds {args.rounds}: use --trials >= 1 and --rounds >= 0")
    try:
        device = setup_compute(args.device)
    except ConfigError as err:  # cuda without a GPU: refused, saying why
        parser.error(f"--{err}")
    partitions = 1
    if args.smoke:
        args.trials, args.rounds, datasets, partitions = 1, 0, ["digits"], 4
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1  # messages exist only inside a run
    figures: dict = {**describe(device), "datasets": {}}
    print(f"bench.gpu on {figures.get('gpu', device)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    for dataset in datasets:
        raw = {**default_run_config(), "dataset": dataset,
               **({"local-epochs": 1, "distill-steps": 20} if args.smoke else {})}
        train = local_training(raw, device, args.trials, partitions)
        distill = distillation_steps(raw, device, args.trials)
        figures["datasets"][dataset] = {"local-training": train, "distillation": distill}
        rates, steps = train["images-per-second"], distill["steps-per-second"]
        print(f"\n{dataset}: local training, {train['examples']} examples x {train['images'] // train['examples']} "
              f"epochs, batch {train['batch-size']} (images/s, median of {args.trials})")
        for name, rate in rates.items():
            print(f"  {name:<22} {rate:>10,.0f}")
        print(f"  ClientApp / plain loop {train['clientapp/plain']:.2f}  (target >= 0.9); data kept on the device / "
              f"each batch copied {train['device-resident/batch-copied']:.2f}")
        print(f"{dataset}: distillation, {distill['steps']} steps of {distill['batch-size']} "
              f"(steps/s) Distiller {steps['distiller']:,.0f}, plain {steps['plain']:,.0f}, "
              f"ratio {distill['distiller/plain']:.2f}")
        save(args.json, figures)
    if args.rounds:
        devices = ["cpu"] + (["cuda"] if device.type == "cuda" else [])
        figures["deployed-round"] = deployed_rounds(datasets[-1], devices, args.rounds)
        print(f"\n{datasets[-1]}: one deployed round, 3 warm SuperNodes, medians over {args.rounds} rounds")
        for name, row in figures["deployed-round"].items():
            print(f"  device={name:<5} round {row['round-seconds']:.2f} s, slowest client {row['client-seconds']:.2f} s, "
                  f"distillation {row['distill-seconds']:.2f} s, final accuracy {row['accuracy']:.4f}")
        save(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
