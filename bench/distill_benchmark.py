"""What distillation buys, beside the usual non-IID baselines: same local and distillation budgets.

    python -m bench.distill_benchmark [--seeds 3] [--rounds 5] [--local-epochs 1] [--distill-steps 50]

FedAvg, FedProx, FedAvgM, FedAdam, ``global`` distillation into the student, and
FedDF (``ensemble`` fused back into the global model, choosing its checkpoint on a
labelled 20 % slice of the server's proxy set, as the FedDF paper holds out a
labelled validation set), each under IID, Dirichlet α=1 and α=0.1, with the FedDF
paper's protocol: 20 clients, 40 % of them per round. ``feddf-unlabelled`` (the
server has no labels at all: the clients check the fusion, ``server/fusion_check.py``)
and its variants run when named in ``--methods``. Every run is a real Flower simulation (one SuperLink, ``flwr run`` per
run) of the shipped app; figures come from its metrics.jsonl. Every method gets
the same local budget (``--local-epochs``) and every distilling method the same
distillation budget (``--distill-steps``); the defaults keep the whole grid
(54 runs) within an hour on a 2-core machine. Prints a table and
writes ``bench/results/<dataset>/{results.json,table.md,accuracy.png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from scripts import launch

METHODS = {  # name -> run-config overrides; every other key at its default
    "fedavg": 'distill="off"',
    "fedprox": 'distill="off" aggregation="fedprox" proximal-mu=0.01',
    "fedavgm": 'distill="off" aggregation="fedavgm"',
    "fedadam": 'distill="off" aggregation="fedadam"',
    "global-student": 'distill="global"',
    "feddf": 'distill="ensemble" distill-target="global" proxy-labelled=true fusion-check="proxy"',
    "feddf-unlabelled": 'distill="ensemble" distill-target="global"',  # idle clients check the fusion (the default)
    "feddf-proxy-guard": 'distill="ensemble" distill-target="global" fusion-check="proxy"',
    "feddf-unlabelled-trained": 'distill="ensemble" distill-target="global" fusion-check-nodes="trained"',
}
DEFAULT_METHODS = [m for m in METHODS if not m.startswith("feddf-")]  # the grid that fits in an hour
PARTITIONINGS = {
    "iid": 'partitioning="iid"',
    "dir1": 'partitioning="dirichlet" dirichlet-alpha=1.0',
    "dir0.1": 'partitioning="dirichlet" dirichlet-alpha=0.1',
}
CONNECTION = "fl-distill-bench"
PORTS = launch.Ports(http=8200, fleet=9292)  # apart from run.sh's and the tests' SuperLinks
RAY_PORT = 6396  # the benchmarks' Ray head: apart from the tests' (6392) and tests/test_ray_cluster.py's


def run_one(home: Path, run_config: str, clients: int, runs: Path) -> tuple[list[dict], dict]:
    """One simulation of the shipped app on the running SuperLink; its metrics rows and summary."""
    run_id = launch.flwr_run(home, CONNECTION, f'{run_config} out-dir="{runs}"', f"num-supernodes={clients}",
                             echo=lambda _: None)
    status = launch.wait_finished(home, CONNECTION, run_id, timeout=600)
    if status != "finished:completed":
        raise RuntimeError(f"run {run_id} ({run_config}) ended {status}")
    rows = [json.loads(line) for line in (runs / str(run_id) / "metrics.jsonl").open()]
    return rows, json.loads((runs / str(run_id) / "summary.json").read_text())


@contextlib.contextmanager
def simulation_superlink(out: Path) -> Iterator[Path]:
    """A simulation SuperLink for a benchmark's runs, Flower home under ``out``, whose simulations join one Ray
    cluster started here (a head on 127.0.0.1:``RAY_PORT``) instead of each ``flwr run`` starting one of its own
    (~10 s a run on two cores: the privacy audit's 28 federations took 50 min, 35 with it); ``$RAY_ADDRESS``,
    when set, names a cluster to join instead. Both stopped afterwards."""
    home = out / "flwr-home"
    launch.write_connection(home, CONNECTION, PORTS.address)
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live there
    address = os.environ.get("RAY_ADDRESS", "")
    processes = [] if address else [launch.start_ray_node(out / "ray-head.log", temp_dir, RAY_PORT, head=True)]
    try:
        processes.append(launch.start_superlink(home, PORTS, simulation=True, ray_address=address or
                                                f"127.0.0.1:{RAY_PORT}"))
        yield home
    finally:
        launch.stop(processes[::-1])
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_all(args: argparse.Namespace, out: Path) -> list[dict]:
    """One simulation per (partitioning, method, seed); returns their metrics rows."""
    results = []
    with simulation_superlink(out) as home:
        for part in args.partitionings:
            part_cfg = PARTITIONINGS[part]
            for method in args.methods:
                method_cfg = METHODS[method]
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    run_config = (f'{part_cfg} {method_cfg} seed={seed} num-server-rounds={args.rounds} '
                                  f'fraction-train={args.fraction} local-epochs={args.local_epochs} '
                                  f'distill-steps={args.distill_steps} deliver="none" '
                                  f'dataset="{args.dataset}" data-root="{args.data_root}"')
                    rows, summary = run_one(home, run_config, args.clients, out / "runs")
                    results.append({"partitioning": part, "method": method, "seed": seed, "rows": rows, "summary": summary})
                    print(f"  {part:7} {method:18} seed {seed}: teacher {rows[-1]['teacher']['accuracy']:.4f}", flush=True)
    return results


def rounds_to(rows: list[dict], target: float) -> int | None:
    return next((r["round"] for r in rows if r["teacher"]["accuracy"] >= target), None)


def mean_sd(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def table(results: list[dict], target: float) -> str:
    lines = [
        f"| partitioning | method | teacher acc | student acc | rounds to {target:.2f} | distill s/round | student/teacher params |",
        "|---|---|---|---|---|---|---|",
    ]
    for part in PARTITIONINGS:
        for method in METHODS:
            runs = [r for r in results if r["partitioning"] == part and r["method"] == method]
            if not runs:
                continue
            teacher = [r["rows"][-1]["teacher"]["accuracy"] for r in runs]
            student = [r["rows"][-1]["student"]["accuracy"] for r in runs if "student" in r["rows"][-1]]
            reached = [n for n in (rounds_to(r["rows"], target) for r in runs) if n is not None]
            to_target = mean_sd(reached, digits=1) if reached else "never"
            if reached and len(reached) < len(runs):
                to_target += f" ({len(reached)}/{len(runs)} seeds)"
            distill = [row["distill"]["seconds"] for r in runs for row in r["rows"] if "distill" in row]
            s = runs[0]["summary"]
            ratio = f"{s['student']['parameters'] / s['teacher']['parameters']:.3f}" if "student" in s else "-"
            lines.append(
                f"| {part} | {method} | {mean_sd(teacher)} | {mean_sd(student)} | {to_target} | "
                f"{statistics.mean(distill) if distill else 0:.2f} | {ratio} |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in PARTITIONINGS if any(r["partitioning"] == p for r in results)]
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, part in zip(axes, parts):
        for i, method in enumerate(METHODS):
            runs = [r for r in results if r["partitioning"] == part and r["method"] == method]
            if not runs:
                continue
            rounds = [row["round"] for row in runs[0]["rows"]]
            for model, style in (("teacher", "-"), ("student", ":")):
                if model not in runs[0]["rows"][-1]:
                    continue
                mean = [statistics.mean(r["rows"][k][model]["accuracy"] for r in runs) for k in range(len(rounds))]
                ax.plot(rounds, mean, style, color=f"C{i}", label=f"{method} {model}")
        ax.set(title=part, xlabel="round", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean over seeds)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's arguments; a bad value exits with one line naming it and what is allowed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds, from --first-seed on")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1, help="every client's local epochs per round")
    parser.add_argument("--distill-steps", type=int, default=50, help="distillation steps per round (global, FedDF)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.4, help="fraction-train: clients sampled per round")
    parser.add_argument("--dataset", default="mnist-5k", choices=["mnist-5k", "digits", "mnist", "fashion-mnist", "cifar10"])
    parser.add_argument("--data-root", default="data", help="folder holding the torchvision dataset")
    parser.add_argument("--target-accuracy", type=float, default=0.7, help="for 'rounds to target'")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated subset of " + ", ".join(METHODS) + " (default: all but feddf-unlabelled)")
    parser.add_argument("--partitionings", default=",".join(PARTITIONINGS),
                        help="comma-separated subset of " + ", ".join(PARTITIONINGS))
    parser.add_argument("--out", default="", help="folder for table.md, accuracy.png, results.json and the runs "
                        "(default bench/results/<dataset>, which holds the figures docs/benchmarks.md shows: give another "
                        "folder for a slice)")
    args = parser.parse_args(argv)
    for name in ("seeds", "rounds", "clients", "local_epochs", "distill_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} = {getattr(args, name)} is not allowed; use 1 or more")
    if args.first_seed < 0:
        parser.error(f"--first-seed = {args.first_seed} is not allowed; use 0 or more")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction = {args.fraction} is not allowed; use a number > 0 and <= 1")
    if not 0 < args.target_accuracy <= 1:
        parser.error(f"--target-accuracy = {args.target_accuracy} is not allowed; use a number > 0 and <= 1")
    for name, known in (("methods", METHODS), ("partitionings", PARTITIONINGS)):
        chosen = getattr(args, name).split(",")
        if unknown := [c for c in chosen if c not in known]:
            parser.error(f"--{name}: {', '.join(map(repr, unknown))} not known; use a subset of {', '.join(known)}")
        if twice := sorted({c for c in chosen if chosen.count(c) > 1}):
            parser.error(f"--{name}: {', '.join(twice)} given more than once")
        setattr(args, name, chosen)
    args.data_root = str(Path(args.data_root).resolve())
    args.out = Path(args.out).resolve() if args.out else launch.REPO / "bench" / "results" / args.dataset
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run_all(args, out)
    wall = time.perf_counter() - started
    text = table(results, args.target_accuracy) + (
        f"\n\n{args.dataset}, {args.clients} clients, fraction-train {args.fraction}, {args.rounds} rounds, "
        f"{args.local_epochs} local epoch(s), {args.distill_steps} distillation steps per round, "
        f"{args.seeds} seeds ({args.first_seed}..{args.first_seed + args.seeds - 1}); {len(results)} runs in "
        f"{wall / 60:.1f} min wall")
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results))
    plot(results, out / "accuracy.png")
    print(f"wrote {out / 'table.md'}, {out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
