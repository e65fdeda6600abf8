"""What differential privacy costs: accuracy against the ε it buys, same seeds, rounds and clients.

    python -m bench.privacy [--seeds 2] [--rounds 8] [--clients 10]

Runs the shipped app in simulation with ``distill="global"`` (teacher = the
aggregate, student distilled from it) for ``dp`` off, central at noise
multipliers 0.3, 0.7 and 1.0, and local (``dp-local-epsilon`` per round), all
at ``dp-clipping-norm`` ``--clipping-norm``. Prints teacher and student accuracy
and the final ε (mean ± sd over seeds) and writes
``bench/results/privacy/{results.json,table.md,accuracy-vs-epsilon.png}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from bench.distill_benchmark import mean_sd, run_one, simulation_superlink
from scripts import launch

SETTINGS = {  # name -> run-config overrides
    "dp off": 'dp="off"',
    "central, noise 0.3": 'dp="central" dp-noise-multiplier=0.3',
    "central, noise 0.7": 'dp="central" dp-noise-multiplier=0.7',
    "central, noise 1.0": 'dp="central" dp-noise-multiplier=1.0',
    "local": 'dp="local"',
}


def table(results: list[dict]) -> str:
    lines = ["| dp | teacher acc | student acc | final ε (δ) |", "|---|---|---|---|"]
    for name in SETTINGS:
        runs = [r for r in results if r["setting"] == name]
        last = [r["rows"][-1] for r in runs]
        privacy = [row["privacy"] for row in last if "privacy" in row]
        epsilon = (f"{statistics.mean(p['epsilon'] for p in privacy):.3g} ({privacy[0]['delta']:.2g}"
                   f"{', per client' if privacy[0]['mechanism'] == 'local' else ''})" if privacy else "∞ (no DP)")
        lines.append(f"| {name} | {mean_sd([row['teacher']['accuracy'] for row in last])} | "
                     f"{mean_sd([row['student']['accuracy'] for row in last])} | {epsilon} |")
    return "\n".join(lines)


def plot(results: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(SETTINGS):
        runs = [r for r in results if r["setting"] == name and "privacy" in r["rows"][-1]]
        if not runs:
            continue  # dp off has no ε: the dashed line
        for model, marker in (("teacher", "o"), ("student", "x")):
            xs = [r["rows"][-1]["privacy"]["epsilon"] for r in runs]
            ys = [r["rows"][-1][model]["accuracy"] for r in runs]
            ax.scatter(xs, ys, marker=marker, color=f"C{i}", label=f"{name}, {model}")
    off = [r["rows"][-1]["teacher"]["accuracy"] for r in results if r["setting"] == "dp off"]
    if off:
        ax.axhline(statistics.mean(off), color="grey", linestyle="--", label="dp off, teacher")
    ax.set(xscale="log", xlabel="final ε (log scale; smaller = more private)", ylabel="test accuracy", ylim=(0, 1),
           title="accuracy against ε")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--clipping-norm", type=float, default=1.0)
    args = parser.parse_args(argv)
    out = launch.REPO / "bench" / "results" / "privacy"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with simulation_superlink(out) as home:
        for name, overrides in SETTINGS.items():
            for seed in range(args.seeds):
                rows, _ = run_one(home, f'distill="global" {overrides} dp-clipping-norm={args.clipping_norm:g} '
                                  f"seed={seed} num-server-rounds={args.rounds}", args.clients, out / "runs")
                results.append({"setting": name, "seed": seed, "rows": rows})
                print(f"  {name:20} seed {seed}: teacher {rows[-1]['teacher']['accuracy']:.4f}"
                      f"  ε {rows[-1].get('privacy', {}).get('epsilon', float('inf')):.3g}", flush=True)
    text = table(results)
    print(f"{args.clients} clients, {args.rounds} rounds, {args.seeds} seeds, clipping norm {args.clipping_norm:g}\n{text}")
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results))
    plot(results, out / "accuracy-vs-epsilon.png")
    print(f"wrote {out / 'table.md'}, {out / 'accuracy-vs-epsilon.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
