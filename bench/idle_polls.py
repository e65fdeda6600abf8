"""What an idle SuperNode costs, and whether backing its polls off slows a run.

    python -m bench.idle_polls [--clients 3] [--rounds 3] [--idle-after 10] [--window 30]

Three federations in one invocation, each a SuperLink and ``--clients`` SuperNodes on 127.0.0.1:

1. stock ``flower-supernode``: Flower's 3 s idle poll, its SuperExec asking for a task every 1 s;
2. ``fl-distill-supernode`` with the backoff off (``--idle-poll-max 0.2 --task-poll-max 0.1``):
   always-short polls, as before ``client/idle_backoff.py``;
3. ``fl-distill-supernode`` with the backoff (its defaults but ``--idle-after``, 10 s here to keep
   the benchmark short; the default is 30 s).

For each, once every node is warm and has been idle past ``--idle-after`` and the backoff's doubling,
it sums the CPU seconds (user + system, ``/proc/PID/stat``) of the SuperLink's and of every SuperNode's
process tree over ``--window`` seconds: **cores per idle node** = that / window / clients (the
SuperLink's share included). Then it runs ``--rounds`` rounds of the app (2 local epochs, no
distillation) and prints the median round wall seconds and fixed overhead (wall − slowest client's
compute − server evaluation), the figures the backoff must leave unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scripts import launch

PORTS = launch.Ports(http=8400, fleet=9492)
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of ``pids``' process trees (processes that exited are not counted)."""
    total = 0
    for root in pids:
        for pid in launch.process_tree(root):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))
    return total / TICK


def measure(name: str, executor: str, node_args: list[str], args: argparse.Namespace, folder: Path) -> dict:
    home, out = folder / "flwr-home", folder / "out"
    launch.write_connection(home, "idle", PORTS.address)
    processes = [launch.start_superlink(home, PORTS, simulation=False)]
    try:
        processes += launch.start_supernodes(home, PORTS, count=args.clients, first_runtime_port=9500,
                                             executor=executor, extra=node_args)
        time.sleep(args.idle_after + 20)  # warm parents ready (~10 s), idle past --idle-after, backoff at its max
        pids = [p.pid for p in processes]
        before, started = cpu_seconds(pids), time.monotonic()
        time.sleep(args.window)
        cores = (cpu_seconds(pids) - before) / (time.monotonic() - started)
        run_config = f'num-server-rounds={args.rounds} min-nodes={args.clients} distill="off" out-dir="{out}"'
        run_id = launch.flwr_run(home, "idle", run_config, stream=False, echo=lambda _: None)
        status = launch.wait_finished(home, "idle", run_id, timeout=1800)
    finally:
        launch.stop(processes)
    if status != "finished:completed":
        raise RuntimeError(f"{name}: run {run_id} ended {status}; see {home}")
    rows = [json.loads(line) for line in (out / str(run_id) / "metrics.jsonl").open()][1:]
    compute = [max(c.get("eval-seconds", 0.0) + c["train-seconds"] for c in r["clients"]) for r in rows]
    return {"name": name, "cores-per-node": cores / args.clients, "cores": cores,
            "round-wall": statistics.median(r["round-seconds"] for r in rows),
            "overhead": statistics.median(r["round-seconds"] - c - r["server-eval-seconds"]
                                          for r, c in zip(rows, compute))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-after", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.idle_after < 0 or args.window < 5:
        parser.error("use --clients >= 1, --rounds >= 1, --idle-after >= 0 and --window >= 5")
    after = ["--idle-after", str(args.idle_after)]
    setups = (("stock flower-supernode", "subprocess", []),
              ("fl-distill-supernode, backoff off", "warm", ["--idle-poll-max", "0.2", "--task-poll-max", "0.1"]),
              (f"fl-distill-supernode, backoff after {args.idle_after:g} s", "warm", after))
    results = []
    with tempfile.TemporaryDirectory(prefix="fl-distill-idle-") as tmp:
        for i, (name, executor, node_args) in enumerate(setups):
            print(f"bench.idle_polls: {name} ...", file=sys.stderr, flush=True)
            results.append(measure(name, executor, node_args, args, Path(tmp) / str(i)))
    print(f"bench.idle_polls: {args.clients} SuperNodes, idle CPU over {args.window:g} s (SuperLink included), "
          f"then {args.rounds} rounds (digits, distill off)")
    print(f"{'setup':<38} {'cores/idle node':>15} {'all cores':>9} {'round wall':>10} {'overhead':>8}")
    for r in results:
        print(f"{r['name']:<38} {r['cores-per-node']:>15.4f} {r['cores']:>9.3f} {r['round-wall']:>9.2f}s "
              f"{r['overhead']:>7.2f}s")
    off, on = results[1], results[2]
    print(f"backoff on / off: idle cores {on['cores'] / off['cores']:.2f}, round wall "
          f"{on['round-wall'] / off['round-wall']:.2f}, fixed overhead {on['overhead'] / off['overhead']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
