"""What differential privacy costs: accuracy against the ε it buys, same seeds, rounds and clients.

    python -m bench.privacy [--seeds 2] [--rounds 8] [--clients 10]
    python -m bench.privacy example    # example-level DP on the distillation benchmark's protocol
    python -m bench.privacy knobs      # what was tried against example's gap
    python -m bench.privacy clients    # central DP against the number of clients per round

Without a part, runs the shipped app in simulation with ``distill="global"`` (teacher = the
aggregate, student distilled from it) for ``dp`` off, central at noise
multipliers 0.3, 0.7 and 1.0, and local (``dp-local-epsilon`` per round), all
at ``dp-clipping-norm`` ``--clipping-norm``. Prints teacher and student accuracy
and the final ε (mean ± sd over seeds) and writes
``bench/results/privacy/{results.json,table.md,accuracy-vs-epsilon.png}``.

``example``: mnist-5k with ``bench.distill_benchmark``'s protocol (20 clients, ``fraction-train`` 0.4,
5 rounds, 1 local epoch), ``dp`` off against ``dp="example"`` at a target ε of 8 per client (δ = 1/pool),
then both DP-sized (``DP_SIZED``: the ``tiny`` family, full-batch DP-SGD for 20 local epochs; with DP each
client's ε spread over the 2 rounds it may train, ``dp-example-rounds``, at δ = 1/n), and that DP row again
with FedDF's fuse-back (``distill="ensemble" distill-target="both"``);
writes ``bench/results/privacy/example/``.

``knobs``: what was tried against ``example``'s gap, one seed: the small model family, a 6x learning
rate, and the same pool in 4 clients of 750 examples that all train every round (a cross-silo shape);
writes ``bench/results/privacy/example-knobs/``.

``clients``: mnist-5k, every client trains every round (``fraction-train`` 1), m = 10, 100 and 500
virtual clients, central DP at noise 1.0 against ``dp`` off at the same m; accuracy and ε against m, and
the noise on the mean √d·σ·C/m beside it; writes ``bench/results/privacy/clients-per-round/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench.distill_benchmark import mean_sd, run_one, simulation_superlink
from scripts import launch

SETTINGS = {  # name -> run-config overrides
    "dp off": 'dp="off"',
    "central, noise 0.3": 'dp="central" dp-noise-multiplier=0.3',
    "central, noise 0.7": 'dp="central" dp-noise-multiplier=0.7',
    "central, noise 1.0": 'dp="central" dp-noise-multiplier=1.0',
    "local": 'dp="local"',
}


EXAMPLE_PROTOCOL = 'dataset="mnist-5k" fraction-train=0.4 distill-steps=50 deliver="none"'
# DP-sized: the tiny family (13k weights), full-batch DP-SGD for 20 local epochs, each client's budget spread
# over the 2 rounds it trains in (20 clients x 2 = the 5 rounds x 8 a round), δ = 1/n for its n = 150 examples
DP_SIZED = 'model-families="tiny" batch-size=150 local-epochs=20 lr=0.2'
DP_SIZED_EXAMPLE = f'dp="example" dp-example-epsilon=8 dp-example-rounds=2 dp-delta=0.0066 {DP_SIZED}'
EXAMPLE_SETTINGS = {
    "dp off": 'dp="off" local-epochs=1',
    "example, target ε 8": 'dp="example" dp-example-epsilon=8 local-epochs=1',
    "tiny, full batch, 20 epochs, dp off": f'dp="off" {DP_SIZED}',
    "tiny, full batch, 20 epochs, example ε 8 over 2 rounds, δ 1/n": DP_SIZED_EXAMPLE,
    "the same, FedDF's fuse-back": f'{DP_SIZED_EXAMPLE} distill="ensemble" distill-target="both"',
}
KNOBS = {  # name -> (overrides on EXAMPLE_PROTOCOL, clients): what was tried against the example part's gap
    "small, dp off": ('model-families="small" dp="off"', 20),
    "small, example ε 8": ('model-families="small" dp="example" dp-example-epsilon=8', 20),
    "small, example ε 8, lr 0.3": ('model-families="small" dp="example" dp-example-epsilon=8 lr=0.3', 20),
    "large, example ε 8, lr 0.3": ('dp="example" dp-example-epsilon=8 lr=0.3', 20),
    "4 clients of 750, dp off": ('dp="off"', 4),
    "4 clients of 750, example ε 8": ('dp="example" dp-example-epsilon=8', 4),
}
CLIENT_COUNTS = (10, 100, 500)
CLIENTS_PROTOCOL = 'dataset="mnist-5k" fraction-train=1.0 local-epochs=1 distill="off" min-nodes=2 deliver="none"'
CLIENTS_SETTINGS = {"dp off": 'dp="off"', "central, noise 1.0": 'dp="central" dp-noise-multiplier=1.0'}


def epsilon_text(last: list[dict]) -> str:
    """Mean final ε over seeds, with δ and whose ε it is, from the last metrics rows."""
    privacy = [row["privacy"] for row in last if "privacy" in row]
    if not privacy:
        return "∞ (no DP)"
    unit = {"local": ", per client", "example": ", per example, worst client"}.get(privacy[0]["mechanism"], "")
    return f"{statistics.mean(p['epsilon'] for p in privacy):.3g} ({privacy[0]['delta']:.2g}{unit})"


def table(results: list[dict], settings: dict = SETTINGS) -> str:
    lines = ["| dp | teacher acc | student acc | final ε (δ) |", "|---|---|---|---|"]
    for name in settings:
        runs = [r for r in results if r["setting"] == name]
        last = [r["rows"][-1] for r in runs]
        lines.append(f"| {name} | {mean_sd([row['teacher']['accuracy'] for row in last])} | "
                     f"{mean_sd([row['student']['accuracy'] for row in last])} | {epsilon_text(last)} |")
    return "\n".join(lines)


def clients_table(results: list[dict], rounds: int) -> str:
    """Accuracy and ε against m, with the noise on the mean (√d·σ·C/m, server/privacy.py) at each m."""
    lines = ["| clients per round m | dp | teacher acc | final ε (δ) | noise on the mean √d·σ·C/m vs C |",
             "|---|---|---|---|---|"]
    for m in CLIENT_COUNTS:
        for name in CLIENTS_SETTINGS:
            last = [r["rows"][-1] for r in results if r["setting"] == name and r["clients"] == m]
            if not last:
                continue
            noise = (f"{r['noise-norm']:.3g} vs 1" if (r := next(r for r in results if r["setting"] == name
                                                                 and r["clients"] == m)).get("noise-norm") else "-")
            lines.append(f"| {m} | {name} | {mean_sd([row['teacher']['accuracy'] for row in last])} | "
                         f"{epsilon_text(last)} | {noise} |")
    return f"mnist-5k, {rounds} rounds, every client every round, clipping norm 1\n\n" + "\n".join(lines)


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


def run_part(part: str, args: argparse.Namespace, out) -> str:
    """Run one part's settings on one SuperLink; its table (also written to ``out``)."""
    import math

    from common.data import SHAPES_AND_CLASSES
    from common.models import build_model

    results = []
    with simulation_superlink(out) as home:
        if part == "settings":
            grid = [(name, f'distill="global" {o} dp-clipping-norm={args.clipping_norm:g}', args.clients)
                    for name, o in SETTINGS.items()]
        elif part == "example":
            grid = [(name, f"{EXAMPLE_PROTOCOL} {o}", args.clients) for name, o in EXAMPLE_SETTINGS.items()]
        elif part == "knobs":  # 4 clients: every one in every round, as a few silos would be
            grid = [(name, EXAMPLE_PROTOCOL.replace("fraction-train=0.4", "fraction-train=1.0" if m == 4 else
                                                    "fraction-train=0.4") + f" local-epochs=1 {o}", m)
                    for name, (o, m) in KNOBS.items()]
        else:
            grid = [(name, f"{CLIENTS_PROTOCOL} {o}", m) for m in CLIENT_COUNTS for name, o in CLIENTS_SETTINGS.items()]
        for name, overrides, clients in grid:
            for seed in range(args.seeds):
                rows, _ = run_one(home, f"{overrides} seed={seed} num-server-rounds={args.rounds}", clients, out / "runs")
                results.append({"setting": name, "seed": seed, "clients": clients, "rows": rows})
                print(f"  {name:30} m={clients:<4} seed {seed}: teacher {rows[-1]['teacher']['accuracy']:.4f}"
                      f"  ε {rows[-1].get('privacy', {}).get('epsilon', float('inf')):.3g}", flush=True)
    if part == "clients":
        shape, classes = SHAPES_AND_CLASSES["mnist-5k"]
        d = sum(p.numel() for p in build_model("large", shape, len(classes)).parameters())
        for r in results:
            if r["setting"] != "dp off":
                r["noise-norm"] = math.sqrt(d) * 1.0 * 1.0 / r["clients"]
        text = clients_table(results, args.rounds)
    else:
        header = (f"{'20 (fraction-train 0.4) or 4 (1.0)' if part == 'knobs' else args.clients} clients, "
                  f"{args.rounds} rounds, {args.seeds} seeds" +
                  (f", clipping norm {args.clipping_norm:g}" if part == "settings" else
                   ", mnist-5k, distill='global'" + (", 1 local epoch" if part == "knobs" else ", fraction-train 0.4")))
        text = header + "\n\n" + table(results, {"settings": SETTINGS, "example": EXAMPLE_SETTINGS}.get(part, KNOBS))
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results))
    if part == "settings":
        plot(results, out / "accuracy-vs-epsilon.png")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="settings", choices=["settings", "example", "knobs", "clients"],
                        help="settings (default): dp modes on digits; example: dp='example' on mnist-5k, 20 clients; "
                             "knobs: what was tried against example's gap; clients: central DP against clients per round")
    parser.add_argument("--seeds", type=int, default=None, help="default 2 (settings, example), 1 (clients)")
    parser.add_argument("--rounds", type=int, default=None, help="default 8 (settings), 5 (example), 3 (clients)")
    parser.add_argument("--clients", type=int, default=None, help="default 10 (settings), 20 (example)")
    parser.add_argument("--clipping-norm", type=float, default=1.0)
    args = parser.parse_args(argv)
    defaults = {"settings": (2, 8, 10), "example": (2, 5, 20), "knobs": (1, 5, None), "clients": (1, 3, None)}[args.part]
    args.seeds = args.seeds or defaults[0]
    args.rounds = args.rounds or defaults[1]
    args.clients = args.clients or defaults[2]
    if args.part in ("clients", "knobs") and args.clients is not None:
        parser.error(f"--clients {args.clients}: the {args.part} part sets the clients of each of its settings")
    out = launch.REPO / "bench" / "results" / "privacy" / {"settings": "", "example": "example",
                                                            "knobs": "example-knobs", "clients": "clients-per-round"}[args.part]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    text = run_part(args.part, args, out)
    print(f"{text}\n{time.perf_counter() - started:.0f} s; wrote {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
