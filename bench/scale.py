"""Thousands of virtual clients: peak memory and round time as the federation grows.

    python -m bench.scale [--clients 100,1000,10000] [--per-round 100] [--rounds 2]

For each count, in one invocation: a simulation SuperLink, ``flwr run`` of the app with that many
virtual clients (``num-supernodes``), ``--per-round`` of them sampled per round (``fraction-train``),
one local epoch, no distillation, on the cross-device setting ``partitioning="sampled"``: each
client holds its own draw of ``examples-per-client`` digits (draws overlap between clients, so any
count of clients holds data; docs/configuration.md). While it runs, every 0.5 s, it reads the
machine's used memory (``MemTotal - MemAvailable``, ``/proc/meminfo``) and the proportional set size
(``Pss``, ``/proc/PID/smaps_rollup``) and anonymous memory (``Pss_Anon``) of every process under the
SuperLink, grouped by program.
Prints, per count: peak machine memory over the idle machine (idle: read once the last count's processes
have gone and memory has settled), the peak of the run's own processes' summed PSS (less noisy: other
programs on the machine do not count), the PSS at the machine's peak by program, each
round's wall seconds (``metrics.jsonl`` ``round-seconds``; round 1 includes asking nodes), and
writes ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from scripts import launch

PORTS = launch.Ports(http=8900, fleet=9992)


def used_mb() -> float:
    """The machine's used memory in MB (what other programs could not have)."""
    info = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def program(pid: int) -> str:
    """A short name for ``pid``: Ray's process title (``ray::ClientAppActor``) or the program it runs."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    first = args[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0]
    words = [a.decode(errors="replace") for a in args[:3] if a]
    name = next((Path(w).name for w in words if not Path(w).name.startswith("python")), Path(first).name)
    return name[:32]


def memory_by_program(root: int) -> dict[str, dict[str, float]]:
    """{measure: {program: summed MB}} over ``root``'s process tree, read from ``/proc/PID/smaps_rollup``.

    ``pss``: proportional set size (each shared page divided among the processes that map it).
    ``anon``: the process's own anonymous memory (``Pss_Anon``: its heap, what it keeps per client), which
    does not move when another process maps or unmaps the same libraries, as PSS does.
    """
    totals: dict[str, Counter] = {"pss": Counter(), "anon": Counter()}
    for pid in launch.process_tree(root):
        try:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in
                      Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]}
            name = program(pid)
            totals["pss"][name] += fields["Pss"] / 1024
            totals["anon"][name] += fields["Pss_Anon"] / 1024
        except (OSError, KeyError, IndexError, ValueError):
            continue
    return {measure: dict(counts) for measure, counts in totals.items()}


RAY_PROGRAMS = ("raylet", "gcs_server", "ray::")


def settled_idle(timeout: float = 90.0) -> float:
    """The machine's used memory once the last run has let go of it: no Ray process left and two readings a
    second apart within 30 MB (at most ``timeout`` seconds)."""
    deadline, last = time.monotonic() + timeout, used_mb()
    while time.monotonic() < deadline:
        time.sleep(1)
        ray_left = any(Path(f"/proc/{p}/cmdline").exists() and any(
            name in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace") for name in RAY_PROGRAMS)
            for p in os.listdir("/proc") if p.isdigit())
        now = used_mb()
        if not ray_left and abs(now - last) < 30:
            return now
        last = now
    return last


def measure(clients: int, args: argparse.Namespace, folder: Path) -> dict:
    home, out = folder / f"flwr-home-{clients}", folder / f"out-{clients}"
    launch.write_connection(home, "scale", PORTS.address)
    idle = settled_idle()
    superlink = launch.start_superlink(home, PORTS, simulation=True)
    peak, peak_pss, peak_tree, started = 0.0, {}, 0.0, time.monotonic()
    peak_by_program: dict[str, dict[str, float]] = {"pss": {}, "anon": {}}
    try:
        run_config = (f'num-server-rounds={args.rounds} fraction-train={min(1.0, args.per_round / clients):.6g} '
                      f'min-nodes=2 local-epochs=1 distill="off" deliver="none" partitioning="sampled" '
                      f'examples-per-client={args.examples} out-dir="{out}"')
        run_id = launch.flwr_run(home, "scale", run_config, f"num-supernodes={clients} client-resources-num-cpus=1",
                                 stream=False, echo=lambda _: None)
        next_status = 0.0
        while True:
            memory = memory_by_program(superlink.pid)
            if (now := used_mb() - idle) > peak:
                peak, peak_pss = now, memory["pss"]
            peak_tree = max(peak_tree, sum(memory["pss"].values()))  # the run's own processes: less noise
            for measure_name, programs in memory.items():
                peaks = peak_by_program[measure_name]
                for name, mb in programs.items():
                    peaks[name] = max(peaks.get(name, 0.0), mb)
            if time.monotonic() > next_status:
                if (status := launch.run_status(home, "scale", run_id)).startswith("finished"):
                    break
                if time.monotonic() - started > args.timeout:
                    raise TimeoutError(f"{clients} clients: not finished after {args.timeout:g} s ({status})")
                next_status = time.monotonic() + 5
            time.sleep(0.5)
    finally:
        launch.stop([superlink])
    if status != "finished:completed":
        raise RuntimeError(f"{clients} clients: the run ended {status}; see {home / 'superlink.log'}")
    rows = [json.loads(line) for line in (out / str(run_id) / "metrics.jsonl").read_text().splitlines()]
    return {"clients": clients, "per-round": min(clients, args.per_round), "peak-mb-over-idle": peak,
            "pss-mb-at-peak": peak_pss, "peak-pss-mb": peak_tree, "peak-pss-mb-by-program": peak_by_program["pss"],
            "peak-anon-mb-by-program": peak_by_program["anon"], "round-seconds": [r["round-seconds"] for r in rows if r["round"] > 0],
            "wall-seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="100,1000,10000", help="comma-separated virtual client counts")
    parser.add_argument("--per-round", type=int, default=100, help="clients sampled per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=20, help="examples-per-client")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per count before giving up")
    args = parser.parse_args(argv)
    try:
        counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients = {args.clients!r} is not allowed; use counts separated by commas, e.g. 100,1000")
    if min(counts) < 2 or args.per_round < 2 or args.rounds < 1 or args.examples < 1:
        parser.error("use --clients counts >= 2, --per-round >= 2, --rounds >= 1 and --examples >= 1")
    results = []
    with tempfile.TemporaryDirectory(prefix="fl-distill-scale-") as tmp:
        for clients in counts:
            results.append(measure(clients, args, Path(tmp)))
            r = results[-1]
            print(f"bench.scale: {clients} clients: peak {r['peak-mb-over-idle']:.0f} MB over idle, rounds "
                  + ", ".join(f"{s:.1f}" for s in r["round-seconds"]) + " s", file=sys.stderr, flush=True)
    print(f"bench.scale: {args.per_round} sampled per round, {args.rounds} rounds, 1 local epoch, distill off, "
          f"digits, partitioning='sampled' ({args.examples} examples per client)")
    print(f"{'clients':>8} {'peak MB over idle':>18} {'peak PSS MB':>12} {'round 1 s':>10} {'later rounds s':>15}  "
          "PSS at the machine's peak (MB)")
    for r in results:
        later = r["round-seconds"][1:]
        pss = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["pss-mb-at-peak"].items(), key=lambda kv: -kv[1]))
        print(f"{r['clients']:>8} {r['peak-mb-over-idle']:>18.0f} {r['peak-pss-mb']:>12.0f} {r['round-seconds'][0]:>10.1f} "
              f"{(sum(later) / len(later)) if later else float('nan'):>15.1f}  {pss}")
    if len(results) > 1:
        a, b = results[0], results[-1]
        added = b["clients"] - a["clients"]
        server = ("flwr-simulation", "flower-superlink")
        anon = sum(b["peak-anon-mb-by-program"].get(p, 0.0) - a["peak-anon-mb-by-program"].get(p, 0.0) for p in server)
        print(f"memory per added client: {1024 * (b['peak-pss-mb'] - a['peak-pss-mb']) / added:.1f} KB of PSS, "
              f"{1024 * (b['peak-mb-over-idle'] - a['peak-mb-over-idle']) / added:.1f} KB machine-wide, "
              f"{1024 * anon / added:.1f} KB of the server side's anonymous memory (the ServerApp and the SuperLink)")
    target = launch.REPO / "bench" / "results" / "scale.json"
    target.write_text(json.dumps({"per-round": args.per_round, "rounds": args.rounds, "examples-per-client":
                                  args.examples, "results": results}, indent=2))
    print(f"written: {target.relative_to(launch.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
