"""What one round costs, split into compute and overhead, in simulation and in deployment.

    python -m bench.round_overhead [--clients 3] [--rounds 3]

Runs the shipped app twice — Flower's simulation engine, then a SuperLink and
``--clients`` SuperNodes as separate processes on 127.0.0.1 (gRPC) — and prints,
per round: wall seconds, the train phase's wall seconds, the slowest client's
own training seconds, distillation seconds, and the overhead (train phase minus
slowest client: message transport, ClientApp process start, imports, polling).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from scripts import launch

PORTS = launch.Ports(http=8300, fleet=9392)


def run(home: Path, out: Path, clients: int, rounds: int, simulation: bool) -> list[dict]:
    launch.write_connection(home, "overhead", PORTS.address)
    processes = [launch.start_superlink(home, PORTS, simulation=simulation)]
    try:
        if not simulation:
            processes += launch.start_supernodes(home, PORTS, count=clients, first_runtime_port=9400)
        run_config = f'num-server-rounds={rounds} min-nodes={clients} out-dir="{out}"'
        run_id = launch.flwr_run(home, "overhead", run_config, f"num-supernodes={clients}" if simulation else "",
                                 stream=False, echo=lambda _: None)
        status = launch.wait_finished(home, "overhead", run_id, timeout=1800)
    finally:
        launch.stop(processes)
    if status != "finished:completed":
        raise RuntimeError(f"run {run_id} ended {status}")
    return [json.loads(line) for line in (out / str(run_id) / "metrics.jsonl").open()][1:]


def report(name: str, rows: list[dict]) -> None:
    print(f"\n{name}: seconds per round")
    print(f"{'round':>5} {'wall':>7} {'train':>7} {'client':>7} {'distill':>7} {'overhead':>8}")
    overheads = []
    for r in rows:
        client = max(c["train-seconds"] for c in r["clients"])
        overheads.append(r["train-seconds"] - client)
        print(f"{r['round']:>5} {r['round-seconds']:>7.1f} {r['train-seconds']:>7.1f} {client:>7.2f} "
              f"{r['distill']['seconds']:>7.1f} {overheads[-1]:>8.1f}")
    print(f"median overhead of the train phase: {statistics.median(overheads):.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for name, simulation in (("simulation", True), ("deployment (subprocess isolation)", False)):
            folder = Path(tmp) / name.split()[0]
            report(name, run(folder / "flwr-home", folder / "out", args.clients, args.rounds, simulation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
