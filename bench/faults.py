"""Faults on real processes: a SuperLink and SuperNodes on 127.0.0.1 (gRPC, warm executor), one scenario per run.

    python -m bench.faults [--clients 5] [--rounds 4] [--round-timeout 30] [--node-wait-timeout 10]

Scenarios (same seed and config; ``min-nodes`` = ``--clients``):
- clean: no fault (the reference for time and accuracy);
- SIGKILL 30 %: 30 % of the SuperNodes (rounded up) killed with SIGKILL in the middle of round 2;
- SIGSTOP: one SuperNode stopped in round 2 for round-timeout + 10 s, then continued;
- SuperLink restart: the SuperLink (``--database``) and its ServerApp killed with SIGKILL in round 2,
  restarted on the same database, then ``flwr run … resume-from=<run folder>``;
- bad updates: in rounds 2, 3 and 4 one client's update arrives with a NaN, with a tensor of another
  shape, and scaled by 1e30 (``bench/fault_injection.py``, a test-only ServerApp that corrupts replies
  as they are pulled), once per aggregation choice.

Prints a table (status, rounds completed, seconds lost against the clean run, the longest wait for
replies in a round (marked ``!`` past the round timeout) and for ``min-nodes``, final teacher accuracy,
whether the global model is finite, rejected updates, replies per round) and writes
``bench/results/faults.json`` (with ``--only WORD``: ``faults-WORD.json``, so the full table's file is kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.numpy import load_file

from scripts import launch

PORTS = launch.Ports(http=8500, fleet=9592)
RUNTIME_PORT = 9600
CONNECTION = "faults"
BAD_UPDATES = "nan@2,shape@3,scale@4"
LIES = "examples@2,examples@3,examples@4"


@dataclass
class Federation:
    """One scenario's processes and folders; ``processes`` are all stopped at the end."""

    home: Path
    out: Path
    app: Path
    database: Path
    processes: list = field(default_factory=list)

    def wait_for_round(self, run_id: int, server_round: int, timeout: float = 300) -> None:
        """Until ``server_round``'s line is in metrics.jsonl (round 0 is the first line)."""
        path, deadline = self.out / str(run_id) / "metrics.jsonl", time.monotonic() + timeout
        while not path.exists() or len(path.read_text().splitlines()) < server_round + 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"round {server_round} of run {run_id} not done within {timeout:.0f} s")
            time.sleep(0.2)


@dataclass
class Scenario:
    name: str
    faults: str
    settings: str = ""
    plan: str = ""  # FL_DISTILL_BENCH_FAULTS for the ServerApp
    # Runs while the run is going; returns the run ID whose status decides (a resumed run's, after a restart).
    act: Callable[[Federation, int, argparse.Namespace], int] = lambda fed, run_id, args: run_id


def kill_30_percent(fed: Federation, run_id: int, args) -> int:
    fed.wait_for_round(run_id, 1)
    time.sleep(1.0)  # into round 2's training
    for node in fed.processes[1:1 + math.ceil(0.3 * args.clients)]:
        launch.crash(node)
    return run_id


def stop_one_past_the_timeout(fed: Federation, run_id: int, args) -> int:
    fed.wait_for_round(run_id, 1)
    time.sleep(1.0)
    node = fed.processes[1]
    os.killpg(node.pid, signal.SIGSTOP)
    try:
        time.sleep(args.round_timeout + 10)
    finally:
        os.killpg(node.pid, signal.SIGCONT)
    return run_id


def restart_superlink_and_resume(fed: Federation, run_id: int, args) -> int:
    fed.wait_for_round(run_id, 1)
    time.sleep(1.0)
    launch.crash(fed.processes[0])
    fed.processes.append(launch.start_superlink(fed.home, PORTS, simulation=False,
                                                extra=["--database", str(fed.database)]))
    return launch.flwr_run(fed.home, CONNECTION, f'{settings(args)} resume-from="{fed.out / str(run_id)}"',
                           stream=False, app=fed.app)


def scenarios(args) -> list[Scenario]:
    killed = math.ceil(0.3 * args.clients)
    return [
        Scenario("clean", "none"),
        Scenario("SIGKILL 30 %", f"{killed} of {args.clients} SuperNodes killed mid-round 2", act=kill_30_percent),
        Scenario("SIGSTOP", f"1 SuperNode stopped {args.round_timeout + 10:g} s from mid-round 2",
                 act=stop_one_past_the_timeout),
        Scenario("SuperLink restart", "SuperLink + ServerApp SIGKILLed mid-round 2, restarted, resume-from",
                 act=restart_superlink_and_resume),
        Scenario("bad updates, fedavg", "NaN r2, wrong shape r3, x1e30 r4", plan=BAD_UPDATES),
        Scenario("bad updates, fedavg + max-update-norm", "NaN r2, wrong shape r3, x1e30 r4",
                 f"max-update-norm={args.max_update_norm:g}", BAD_UPDATES),
        Scenario("bad updates, trimmed-mean", "NaN r2, wrong shape r3, x1e30 r4",
                 'aggregation="trimmed-mean"', BAD_UPDATES),
        Scenario("bad updates, median", "NaN r2, wrong shape r3, x1e30 r4", 'aggregation="median"', BAD_UPDATES),
        Scenario("claims 10^12 examples, fedavg", "one reply a round claims 10^12 examples, r2-r4", plan=LIES),
    ]


def settings(args, extra: str = "") -> str:
    return (f"num-server-rounds={args.rounds} min-nodes={args.clients} round-timeout={args.round_timeout:g} "
            f'node-wait-timeout={args.node_wait_timeout:g} out-dir="{args.out}" {extra}').strip()


def app_copy(folder: Path) -> Path:
    """The app with ``bench/fault_injection.py`` as its ServerApp (nothing else changes)."""
    app = folder / "app"
    for package in ("server", "client", "common"):
        shutil.copytree(launch.REPO / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    (app / "bench").mkdir()
    for name in ("__init__.py", "fault_injection.py"):
        shutil.copy(launch.REPO / "bench" / name, app / "bench" / name)
    pyproject = (launch.REPO / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        pyproject.replace('serverapp = "server.server_app:app"', 'serverapp = "bench.fault_injection:app"'))
    return app


def run_scenario(scenario: Scenario, folder: Path, app: Path, args) -> dict:
    fed = Federation(folder / "flwr-home", args.out, app, folder / "superlink.db")
    launch.write_connection(fed.home, CONNECTION, PORTS.address)
    os.environ["FL_DISTILL_BENCH_FAULTS"] = scenario.plan
    started = time.monotonic()
    try:
        fed.processes.append(launch.start_superlink(fed.home, PORTS, simulation=False,
                                                    extra=["--database", str(fed.database)]))
        fed.processes += launch.start_supernodes(fed.home, PORTS, args.clients, RUNTIME_PORT, executor="warm")
        first_id = launch.flwr_run(fed.home, CONNECTION, settings(args, scenario.settings), stream=False, app=app)
        deciding_id = scenario.act(fed, first_id, args)
        status = launch.wait_finished(fed.home, CONNECTION, deciding_id, timeout=1200)
        wall = time.monotonic() - started
    finally:
        launch.stop(fed.processes)
        os.environ.pop("FL_DISTILL_BENCH_FAULTS", None)
    run_dir = args.out / str(first_id)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    model = run_dir / "global.safetensors"
    finite = model.exists() and all(math.isfinite(float(abs(v).max())) for v in load_file(str(model)).values())
    return {
        "scenario": scenario.name, "faults": scenario.faults, "status": status, "rounds": rows[-1]["round"],
        "wall-seconds": wall,
        "longest-reply-wait": max((r.get("train-seconds", 0.0) - r.get("node-wait-seconds", 0.0) for r in rows), default=0.0),
        "longest-node-wait": max((r.get("node-wait-seconds", 0.0) for r in rows), default=0.0),
        "median-round-seconds": statistics.median(r["round-seconds"] for r in rows[2:]) if len(rows) > 2 else None,
        "accuracy": rows[-1]["teacher"]["accuracy"], "finite": finite,
        "rejected": sum(len(r.get("rejected", [])) for r in rows),
        "heard-from": [len(r.get("heard-from", [])) for r in rows[1:]],
    }


def table(results: list[dict], round_timeout: float) -> str:
    clean = results[0]
    header = (f"{'scenario':<38} {'status':<19} {'rounds':>6} {'s lost':>7} {'reply wait':>10} {'node wait':>9} "
              f"{'teacher acc':>11} {'finite':>6} {'rejected':>8}  replies per round")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r['scenario']:<38} {r['status']:<19} {r['rounds']:>6} {r['wall-seconds'] - clean['wall-seconds']:>7.1f} "
            f"{r['longest-reply-wait']:>8.1f} s{'' if r['longest-reply-wait'] <= round_timeout + 2 else '!'} "
            f"{r['longest-node-wait']:>7.1f} s "
            f"{r['accuracy']:>11.4f} {'yes' if r['finite'] else 'NO':>6} {r['rejected']:>8}  {r['heard-from']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--round-timeout", type=float, default=30.0)
    parser.add_argument("--node-wait-timeout", type=float, default=10.0)
    parser.add_argument("--max-update-norm", type=float, default=10.0)
    parser.add_argument("--only", default="", help="run only scenarios whose name contains this (the clean one always runs)")
    args = parser.parse_args(argv)
    if args.clients < 2 or args.rounds < 4:
        parser.error("use --clients >= 2 and --rounds >= 4 (faults land in rounds 2 to 4)")
    results = []
    with tempfile.TemporaryDirectory(prefix="fl-distill-faults-") as tmp:
        args.out = Path(tmp) / "out"
        app = app_copy(Path(tmp))
        for i, scenario in enumerate(scenarios(args)):
            if i and args.only not in scenario.name:
                continue
            print(f"bench.faults: {scenario.name} ...", file=sys.stderr, flush=True)
            results.append(run_scenario(scenario, Path(tmp) / f"scenario-{i}", app, args))
            print(f"  {results[-1]}", file=sys.stderr, flush=True)
    settings_line = (f"{args.clients} SuperNodes (warm executor), {args.rounds} rounds, min-nodes={args.clients}, "
                     f"round-timeout={args.round_timeout:g} s, node-wait-timeout={args.node_wait_timeout:g} s, digits")
    print(f"bench.faults: {settings_line}\n{table(results, args.round_timeout)}")
    name = f"faults-{re.sub(r'[^A-Za-z0-9]+', '-', args.only).strip('-')}.json" if args.only else "faults.json"
    target = launch.REPO / "bench" / "results" / name
    target.write_text(json.dumps({"settings": settings_line, "results": results}, indent=2))
    print(f"written: {target.relative_to(launch.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
