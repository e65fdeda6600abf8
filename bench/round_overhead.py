"""What one round costs, split into compute and fixed overhead: simulation vs deployment, stock vs warm.

    python -m bench.round_overhead [--clients 3] [--rounds 4]

Runs the shipped app three times in one invocation, same seed and config:
1. Flower's simulation engine;
2. a SuperLink and ``--clients`` SuperNodes as processes on 127.0.0.1 (gRPC), stock
   ``flower-supernode``: a fresh ``flwr-clientapp`` process per message;
3. the same with ``fl-distill-supernode``: warm executor, short polls (``client/``);
4. and 5. the warm deployment again with FedDF (``distill="ensemble" distill-target="global"``), once with
   the clients' fusion check (``fusion-check="clients"``: the nodes score the averaged model while the
   server distils, and a fused one after) and once with the proxy criterion alone
   (``fusion-check="proxy"``): what the check costs, in seconds and bytes.

Per round it prints wall seconds, the slowest client's compute (its pre-training
evaluation + local training, as the client measured it), distillation, server
evaluation (test set + checkpoints), and the **fixed overhead = wall − slowest
client − distillation − server evaluation**: message transport, process start,
imports, polls. Then the final teacher accuracy of each mode, and the resident
memory of each SuperNode with its executor (RSS, and PSS: shared pages split
between the processes that share them), measured idle after the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from scripts import launch

PORTS = launch.Ports(http=8300, fleet=9392)
FEDDF = 'distill="ensemble" distill-target="global"'
MODES = (("simulation", None, ""), ("deployment, subprocess isolation", "subprocess", ""),
         ("deployment, warm executor", "warm", ""),
         ("warm, FedDF with the clients' fusion check", "warm", f'{FEDDF} fusion-check="clients"'),
         ("warm, FedDF with the proxy criterion alone", "warm", f'{FEDDF} fusion-check="proxy"'))


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB of ``pid``'s process tree."""
    rss = pss = 0
    for p in launch.process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss / 1024, pss / 1024


def run(home: Path, out: Path, clients: int, rounds: int, executor: str | None,
        extra: str = "") -> tuple[list[dict], list[tuple], dict]:
    """One run; returns its metrics lines (round 0 included), each SuperNode's memory and its summary.json."""
    launch.write_connection(home, "overhead", PORTS.address)
    processes = [launch.start_superlink(home, PORTS, simulation=executor is None)]
    memory = []
    try:
        if executor:
            processes += launch.start_supernodes(home, PORTS, count=clients, first_runtime_port=9400, executor=executor)
        run_config = f'num-server-rounds={rounds} min-nodes={clients} out-dir="{out}" {extra}'
        run_id = launch.flwr_run(home, "overhead", run_config, "" if executor else f"num-supernodes={clients}",
                                 stream=False, echo=lambda _: None)
        status = launch.wait_finished(home, "overhead", run_id, timeout=1800)
        memory = [memory_mb(p.pid) for p in processes[1:]]
    finally:
        launch.stop(processes)
    if status != "finished:completed":
        raise RuntimeError(f"run {run_id} ended {status}; see {home}")
    rows = [json.loads(line) for line in (out / str(run_id) / "metrics.jsonl").open()]
    return rows, memory, json.loads((out / str(run_id) / "summary.json").read_text())


def client_compute(row: dict) -> float:
    return max(c.get("eval-seconds", 0.0) + c["train-seconds"] for c in row["clients"])


def report(name: str, rows: list[dict], memory: list[tuple], run_summary: dict) -> dict:
    print(f"\n{name}: seconds per round")
    print(f"{'round':>5} {'wall':>7} {'client':>7} {'distill':>7} {'eval':>6} {'overhead':>8} {'check':>6}  kept")
    overheads, walls = [], []
    for r in rows[1:]:
        parts = (client_compute(r), r["distill"]["seconds"], r["server-eval-seconds"])
        overheads.append(r["round-seconds"] - sum(parts))
        walls.append(r["round-seconds"])
        fusion = r.get("fusion", {})
        check = f"{fusion['seconds']:>6.2f}" if "seconds" in fusion else f"{'-':>6}"
        print(f"{r['round']:>5} {r['round-seconds']:>7.2f} {parts[0]:>7.2f} {parts[1]:>7.2f} {parts[2]:>6.2f} "
              f"{overheads[-1]:>8.2f} {check}  {fusion.get('kept', '-')} ({fusion.get('by', '-')})")
    summary = {"wall": statistics.median(walls), "overhead": statistics.median(overheads),
               "accuracy": rows[-1]["teacher"]["accuracy"]}
    checks = [r["fusion"] for r in rows[1:] if "seconds" in r.get("fusion", {})]
    if checks:  # the overhead column includes the check: it is one more message per node
        summary["check"] = statistics.median(c["seconds"] for c in checks)
        summary["check-bytes"] = statistics.median(c["bytes-sent"] for c in checks)
        print(f"fusion check in {len(checks)} of {len(rows) - 1} rounds: median {summary['check']:.2f} s, "
              f"{summary['check-bytes'] / 1e6:.2f} MB of models sent a round ({checks[0]['asked']} nodes)")
    print(f"median wall {summary['wall']:.2f} s, median fixed overhead {summary['overhead']:.2f} s, "
          f"final teacher accuracy {summary['accuracy']:.4f}")
    if "delivery-seconds" in run_summary:  # the models to every node, once, after the last round
        summary["delivery"] = run_summary["delivery-seconds"]
        print(f"delivery of the student to {run_summary['nodes']} node(s) after the last round: "
              f"{summary['delivery']:.2f} s (installed on {run_summary['delivered-to']})")
    for i, (rss, pss) in enumerate(memory):
        print(f"SuperNode {i} with its executor, idle: RSS {rss:.0f} MB, PSS {pss:.0f} MB")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.rounds < 1:
        parser.error(f"--clients {args.clients} --rounds {args.rounds}: both must be 1 or more")
    summaries = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, executor, extra) in enumerate(MODES):
            folder = Path(tmp) / str(i)
            summaries[name] = report(name, *run(folder / "flwr-home", folder / "out", args.clients, args.rounds,
                                                executor, extra))
    warm, stock = summaries["deployment, warm executor"], summaries["deployment, subprocess isolation"]
    print(f"\nwarm / subprocess round wall (medians): {warm['wall']:.2f} / {stock['wall']:.2f} = {warm['wall'] / stock['wall']:.2f}")
    checked, proxy = (summaries[name] for name, _, _ in MODES[3:])
    print(f"FedDF, warm: fixed overhead with the clients' check / with the proxy criterion (medians): "
          f"{checked['overhead']:.2f} / {proxy['overhead']:.2f} s, +{checked['overhead'] - proxy['overhead']:.2f} s a "
          f"round; the check itself {checked.get('check', 0.0):.2f} s and {checked.get('check-bytes', 0) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
