"""A long deployed run: does anything grow round after round?

    python -m bench.soak [--rounds 200] [--clients 3] [--every 10]

A SuperLink and ``--clients`` warm SuperNodes on 127.0.0.1 run ``--rounds`` rounds of the app
(one local epoch, no distillation, digits). Every ``--every`` rounds (read from the run's
``metrics.jsonl``) it samples the resident memory (RSS, ``/proc/PID/status``) and the open file
descriptors (``/proc/PID/fd``) of the SuperLink process, of the ServerApp (the rest of the
SuperLink's process tree: its SuperExec and the ServerApp process) and of each SuperNode's lasting
processes (SuperNode, executor, warm parent; not the tasks, which live within a round). Prints a table and the growth of each from the
sample nearest round 20 to the last (targets: memory < 10 %, descriptors none), and writes
``bench/results/soak.json`` and ``soak.png``. A SuperNode's descriptors rise by a few while a task runs
(the executor's pipe to it, the task's connections), so single samples vary by that much.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from scripts import launch

PORTS = launch.Ports(http=8760, fleet=9852)  # apart from the tests' and other benchmarks' SuperLinks


def usage(pids: list[int]) -> tuple[float, int]:
    """(RSS in MB, open descriptors) summed over ``pids`` (processes gone meanwhile count 0)."""
    rss_kb = fds = 0
    for pid in pids:
        try:
            rss_kb += next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:"))
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration):
            pass
    return rss_kb / 1024, fds


def resident(supernode: int) -> list[int]:
    """A SuperNode's lasting processes: itself, its executor (and the executor's helpers) and the warm parent;
    not the ClientApp tasks forked from that parent, which come and go within a round."""
    tree = launch.process_tree(supernode)
    parents = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in tree
               if Path(f"/proc/{pid}/stat").exists()}
    depth = {supernode: 0}
    for pid in tree:  # process_tree lists a parent before its children
        if pid in parents and parents[pid] in depth:
            depth[pid] = depth[parents[pid]] + 1
    return [pid for pid, d in depth.items() if d <= 2]


def sample(superlink: int, supernodes: list[int]) -> dict[str, tuple[float, int]]:
    return {"superlink": usage([superlink]),
            "serverapp": usage([p for p in launch.process_tree(superlink) if p != superlink]),
            **{f"supernode-{i}": usage(resident(pid)) for i, pid in enumerate(supernodes)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args(argv)
    if args.rounds < 2 * args.every or args.clients < 1 or args.every < 1:
        parser.error("use --clients >= 1, --every >= 1 and --rounds >= 2 x --every")
    samples: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fl-distill-soak-") as tmp:
        home, out = Path(tmp) / "flwr-home", Path(tmp) / "out"
        launch.write_connection(home, "soak", PORTS.address)
        processes = [launch.start_superlink(home, PORTS, simulation=False)]
        try:
            processes += launch.start_supernodes(home, PORTS, count=args.clients, first_runtime_port=9860)
            run_config = (f'num-server-rounds={args.rounds} min-nodes={args.clients} local-epochs=1 distill="off" '
                          f'out-dir="{out}"')
            run_id = launch.flwr_run(home, "soak", run_config, stream=False, echo=lambda _: None)
            metrics, started = out / str(run_id) / "metrics.jsonl", time.monotonic()
            next_round, next_status = args.every, time.monotonic() + 30
            while next_round <= args.rounds:
                done = len(metrics.read_text().splitlines()) - 1 if metrics.exists() else 0  # round 0 is a line
                if done >= next_round:
                    row = {"round": done, "seconds": time.monotonic() - started,
                           **sample(processes[0].pid, [p.pid for p in processes[1:]])}
                    samples.append(row)
                    print(f"bench.soak: round {done}: " + ", ".join(
                        f"{k} {v[0]:.0f} MB {v[1]} fds" for k, v in row.items() if isinstance(v, tuple)),
                        file=sys.stderr, flush=True)
                    next_round = (done // args.every + 1) * args.every
                elif time.monotonic() > next_status:  # `flwr ls` costs a process: twice a minute
                    if launch.run_status(home, "soak", run_id).startswith("finished"):
                        break
                    next_status = time.monotonic() + 30
                time.sleep(0.5)
            status = launch.wait_finished(home, "soak", run_id, timeout=600)
        finally:
            launch.stop(processes)
    if status != "finished:completed" or len(samples) < 2:
        raise RuntimeError(f"the soak run ended {status} after {len(samples)} samples")
    names = [k for k in samples[0] if k not in ("round", "seconds")]
    print(f"bench.soak: {args.clients} warm SuperNodes, {args.rounds} rounds (1 local epoch, distill off, digits), "
          f"{samples[-1]['seconds'] / 60:.1f} min; RSS MB / open descriptors")
    print(f"{'round':>5} " + " ".join(f"{n:>16}" for n in names))
    for row in samples:
        print(f"{row['round']:>5} " + " ".join(f"{row[n][0]:>10.0f} /{row[n][1]:>4}" for n in names))
    base = min(samples, key=lambda row: abs(row["round"] - 20))
    print(f"growth from round {base['round']} to {samples[-1]['round']}:")
    growth = {}
    for n in names:
        (rss0, fd0), (rss1, fd1) = base[n], samples[-1][n]
        growth[n] = {"rss-percent": 100 * (rss1 - rss0) / rss0, "fds": fd1 - fd0}
        print(f"  {n:<12} memory {growth[n]['rss-percent']:+.1f} %, descriptors {growth[n]['fds']:+d}")
    target = launch.REPO / "bench" / "results" / "soak.json"
    target.write_text(json.dumps({"rounds": args.rounds, "clients": args.clients, "samples": samples,
                                  "growth": growth}, indent=2))
    plot(target, target.with_suffix(".png"))
    print(f"written: {target.relative_to(launch.REPO)} and soak.png")
    return 0


def plot(results: Path, figure: Path) -> None:
    """Resident memory and open descriptors per sampled round, one line per process group, from soak.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    samples = data["samples"]
    names = [k for k in samples[0] if k not in ("round", "seconds")]
    rounds = [row["round"] for row in samples]
    fig, (memory, fds) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        memory.plot(rounds, [row[name][0] for row in samples], marker=".", label=name)
        fds.plot(rounds, [row[name][1] for row in samples], marker=".", label=name)
    memory.set(xlabel="round", ylabel="resident memory (MB)", ylim=(0, None),
               title=f"{data['clients']} warm SuperNodes, {data['rounds']} rounds")
    fds.set(xlabel="round", ylabel="open file descriptors", ylim=(0, None),
            title="descriptors (a running task's pipe: +3 to +9)")
    memory.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
