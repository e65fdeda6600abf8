"""What distillation buys: FedAvg vs global vs ensemble (FedDF) distillation, same budgets.

    python -m bench.distill_benchmark [--seeds 2] [--rounds 8] [--dataset cifar10 --data-root DIR]

Every run is a real Flower simulation (one SuperLink, `flwr run` per run, 10
virtual clients) of the shipped app; figures come from its metrics.jsonl. Prints
a table and writes ``bench/results/<dataset>/{results.json,table.md,accuracy.png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

from scripts import launch

METHODS = {  # name -> run-config overrides
    "fedavg": 'distill="off"',
    "global": 'distill="global"',
    "ensemble->student": 'distill="ensemble" distill-target="student"',
    "ensemble->global": 'distill="ensemble" distill-target="global"',
}
PARTITIONINGS = {
    "iid": 'partitioning="iid"',
    "dir0.5": 'partitioning="dirichlet" dirichlet-alpha=0.5',
    "dir0.1": 'partitioning="dirichlet" dirichlet-alpha=0.1',
}
CONNECTION = "fl-distill-bench"
PORTS = launch.Ports(http=8200, fleet=9292)  # apart from run.sh's and the tests' SuperLinks


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
    """A simulation SuperLink for a benchmark's runs, Flower home under ``out``; stopped afterwards."""
    home = out / "flwr-home"
    launch.write_connection(home, CONNECTION, PORTS.address)
    superlink = launch.start_superlink(home, PORTS, simulation=True)
    try:
        yield home
    finally:
        launch.stop([superlink])


def run_all(args: argparse.Namespace, out: Path) -> list[dict]:
    """One simulation per (partitioning, method, seed); returns their metrics rows."""
    results = []
    with simulation_superlink(out) as home:
        for part, part_cfg in PARTITIONINGS.items():
            for method, method_cfg in METHODS.items():
                for seed in range(args.seeds):
                    run_config = (f'{part_cfg} {method_cfg} seed={seed} num-server-rounds={args.rounds} '
                                  f'dataset="{args.dataset}" data-root="{args.data_root}"')
                    rows, summary = run_one(home, run_config, args.clients, out / "runs")
                    results.append({"partitioning": part, "method": method, "seed": seed, "rows": rows, "summary": summary})
                    print(f"  {part:7} {method:18} seed {seed}: teacher {rows[-1]['teacher']['accuracy']:.4f}", flush=True)
    return results


def rounds_to(rows: list[dict], target: float) -> int | None:
    return next((r["round"] for r in rows if r["teacher"]["accuracy"] >= target), None)


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


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
            reached = [rounds_to(r["rows"], target) for r in runs]
            to_target = "never" if None in reached else f"{statistics.mean(reached):.1f}"
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

    fig, axes = plt.subplots(1, len(PARTITIONINGS), figsize=(5 * len(PARTITIONINGS), 4), sharey=True)
    for ax, part in zip(axes, PARTITIONINGS):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion-mnist", "cifar10"])
    parser.add_argument("--data-root", default="data", help="folder holding the torchvision dataset")
    parser.add_argument("--target-accuracy", type=float, default=0.95, help="for 'rounds to target'")
    args = parser.parse_args(argv)
    for name in ("seeds", "rounds", "clients"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} = {getattr(args, name)} is not allowed; use 1 or more")
    args.data_root = str(Path(args.data_root).resolve())
    out = launch.REPO / "bench" / "results" / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(args, out)
    text = table(results, args.target_accuracy)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results))
    plot(results, out / "accuracy.png")
    print(f"wrote {out / 'table.md'}, {out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
