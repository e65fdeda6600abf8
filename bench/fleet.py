"""A hundred SuperNodes on one host: memory, idle CPU and round time as the fleet grows, TLS and SuperNode
authentication on.

    python -m bench.fleet [--nodes 10,50,100] [--per-process 1,10] [--rounds 2] [--idle-after 10]

For each fleet size N, one after the other in one invocation: the TLS certificates and N key pairs
(``docker/make-certs.sh``), a SuperLink with TLS and ``--enable-supernode-auth``, the N public keys
registered through Flower's Control API (as ``flwr supernode register`` does), and N SuperNodes as
N / K processes of ``fl-distill-supernode --nodes K`` (K = ``--per-process``; each process one warm
executor, one warm parent), node i with its own key ``supernode-<i>.key``; the server hands out the
partitions. Once every node has connected and every warm parent is ready, it measures, idle: the machine's used memory over the idle
machine, the SuperNode processes' summed PSS, and their CPU over 20 s once the polls have backed off
(``--idle-after``). Then a run of ``--rounds`` rounds in which every node trains (1 local epoch, digits,
the student distilled, no delivery): round seconds from ``metrics.jsonl`` and the peak memory.
K = 1 is the layout without groups, a process and a warm parent per node: it runs only for fleets of up
to ``SINGLES_UP_TO`` nodes (each such node holds ~580 MB). Writes ``bench/results/fleet.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.idle_polls import cpu_seconds
from bench.round_overhead import memory_mb
from bench.scale import settled_idle, used_mb
from scripts import launch

PORTS = launch.Ports(http=8780, fleet=9882)
FIRST_RUNTIME_PORT = 10000
SINGLES_UP_TO = 20


def tls_superlink(certs: Path, home: Path) -> subprocess.Popen:
    """A SuperLink with TLS and SuperNode authentication; a ``flwr`` connection ``fleet`` to it in ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\naddress = "{PORTS.address}"\n'
        f'root-certificates = "{certs / "public" / "ca.crt"}"\n')
    server = certs / "superlink"
    return launch.start(
        [launch.bin_path("flower-superlink"), "--ssl-ca-certfile", str(server / "ca.crt"), "--ssl-certfile",
         str(server / "server.pem"), "--ssl-keyfile", str(server / "server.key"), "--enable-supernode-auth",
         "--host", "127.0.0.1", "--port", str(PORTS.http), "--fleet-api-address", f"127.0.0.1:{PORTS.fleet}"],
        home / "superlink.log", launch.flower_env(home))


def register_keys(home: Path, keys: list[Path], timeout: float = 60) -> None:
    """Register each public key with the SuperLink of ``home``'s connection, in this process (Flower's
    ``flwr supernode register``, less a process start per key)."""
    os.environ["FLWR_HOME"] = str(home)
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611

    deadline = time.monotonic() + timeout
    while True:  # the SuperLink's Control API may not listen yet
        try:
            client = init_http_client_from_connection(read_superlink_connection("fleet"))
            client.RegisterNode(request=RegisterNodeRequest(public_key=try_load_public_key(keys[0])))
            break
        except Exception:  # pylint: disable=broad-exception-caught
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    try:
        for key in keys[1:]:
            client.RegisterNode(request=RegisterNodeRequest(public_key=try_load_public_key(key)))
    finally:
        client.close()


def connected(logs: list[Path]) -> int:
    """SuperNodes that got their node ID from the SuperLink (Flower logs ``SuperNode ID: <id>``)."""
    return sum(len(re.findall(r"SuperNode ID: \d+", log.read_text())) for log in logs if log.exists())


def warm_parents(logs: list[Path]) -> int:
    """Processes whose executor's warm parent is ready (``fl-distill-executor: warm parent <pid> ready``)."""
    return sum(bool(re.search(r"warm parent \d+ ready", log.read_text())) for log in logs if log.exists())


def measure(nodes: int, per_process: int, args: argparse.Namespace, folder: Path) -> dict:
    certs, home, out = folder / "certs", folder / "flwr-home", folder / "out"
    subprocess.run(["bash", str(launch.REPO / "docker" / "make-certs.sh"), "-n", str(nodes), str(certs)],
                   check=True, capture_output=True)
    idle = settled_idle()
    processes = [tls_superlink(certs, home)]
    try:
        register_keys(home, [certs / "supernodes" / f"supernode-{i}.key.pub" for i in range(1, nodes + 1)])
        logs = []
        for first in range(1, nodes + 1, per_process):
            count = min(per_process, nodes + 1 - first)
            logs.append(home / f"group-{first}.log")
            processes.append(launch.start(
                [launch.bin_path("fl-distill-supernode"), "--nodes", str(count), "--first-index", str(first),
                 "--idle-after", str(args.idle_after), "--root-certificates", str(certs / "supernodes" / "ca.crt"),
                 "--auth-supernode-private-key", str(certs / "supernodes" / "supernode-{i}.key"),
                 "--superlink", f"127.0.0.1:{PORTS.fleet}", "--port", str(FIRST_RUNTIME_PORT + first),
                 "--node-config", f'model-dir="{home}/models-{{i}}"'], logs[-1], launch.flower_env(home)))
        started = time.monotonic()
        while connected(logs) < nodes:
            if time.monotonic() - started > 60 + 3 * nodes:
                raise TimeoutError(f"{connected(logs)} of {nodes} SuperNodes connected; see {home}")
            if any(p.poll() is not None for p in processes):
                raise RuntimeError(f"a process ended while the fleet connected; see {home}")
            time.sleep(1)
        connect_seconds = time.monotonic() - started
        while warm_parents(logs) < len(logs):  # each process's warm parent imports torch: CPU, not idle
            if time.monotonic() - started > 120 + 10 * len(logs):
                raise TimeoutError(f"{warm_parents(logs)} of {len(logs)} warm parents ready; see {home}")
            time.sleep(1)
        time.sleep(args.idle_after + 10)  # polls backed off
        fleet = [p.pid for p in processes[1:]]
        idle_mb, pss = used_mb() - idle, sum(memory_mb(pid)[1] for pid in fleet)
        before, window = cpu_seconds(fleet), time.monotonic()
        time.sleep(20)
        cores = (cpu_seconds(fleet) - before) / (time.monotonic() - window)
        run_config = (f'num-server-rounds={args.rounds} min-nodes={nodes} local-epochs=1 deliver="none" '
                      f'node-wait-timeout=60 out-dir="{out}"')
        run_id = launch.flwr_run(home, "fleet", run_config, stream=False, echo=lambda _: None)
        peak, status = idle_mb, "running"
        while not status.startswith("finished"):
            peak = max(peak, used_mb() - idle)
            status = launch.run_status(home, "fleet", run_id) if int(time.monotonic()) % 5 == 0 else status
            time.sleep(1)
    finally:
        launch.stop(processes)
    if status != "finished:completed":
        raise RuntimeError(f"{nodes} SuperNodes: the run ended {status}; see {home}")
    rows = [json.loads(line) for line in (out / str(run_id) / "metrics.jsonl").read_text().splitlines()][1:]
    trained = [len(r["clients"]) for r in rows]
    return {"nodes": nodes, "per-process": per_process, "processes": len(fleet), "connect-seconds": connect_seconds,
            "idle-mb-over-idle": idle_mb, "idle-pss-mb": pss, "idle-cores": cores, "peak-mb-over-idle": peak,
            "round-seconds": [r["round-seconds"] for r in rows], "trained": trained,
            "accuracy": rows[-1]["teacher"]["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="10,50,100", help="comma-separated fleet sizes")
    parser.add_argument("--per-process", default="1,10",
                        help="SuperNodes per process (--nodes of each), comma-separated: each fleet size with each")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle-after", type=float, default=10.0, help="the SuperNodes' --idle-after")
    args = parser.parse_args(argv)
    try:
        sizes = [int(n) for n in args.nodes.split(",")]
        groups = [int(k) for k in args.per_process.split(",")]
    except ValueError:
        parser.error(f"--nodes = {args.nodes!r} --per-process = {args.per_process!r}: use whole numbers separated "
                     "by commas, e.g. --nodes 10,50,100 --per-process 1,10")
    if min(sizes) < 2 or not all(1 <= k <= 1000 for k in groups) or args.rounds < 1 or args.idle_after < 0:
        parser.error("use --nodes sizes >= 2, --per-process 1 to 1000, --rounds >= 1 and --idle-after >= 0")
    results = []
    with tempfile.TemporaryDirectory(prefix="fl-distill-fleet-") as tmp:
        for nodes in sizes:
            for per_process in groups:
                if per_process == 1 and nodes > SINGLES_UP_TO:
                    print(f"bench.fleet: {nodes} SuperNodes with a process each left out (~580 MB a node)",
                          file=sys.stderr)
                    continue
                results.append(measure(nodes, per_process, args, Path(tmp) / f"{nodes}-{per_process}"))
                r = results[-1]
                print(f"bench.fleet: {nodes} SuperNodes, {per_process} a process: idle {r['idle-mb-over-idle']:.0f} "
                      "MB over idle, rounds " + ", ".join(f"{s:.1f}" for s in r["round-seconds"]) + " s",
                      file=sys.stderr, flush=True)
    print(f"bench.fleet: SuperNodes on this host, TLS and SuperNode authentication on; {args.rounds} rounds, every "
          "node trains (digits, 1 local epoch); one warm parent per process")
    print(f"{'nodes':>5} {'per process':>11} {'idle MB over idle':>17} {'SuperNodes PSS MB':>17} {'idle cores':>10} "
          f"{'peak MB over idle':>17} {'round s (median)':>16} {'trained/round':>13}")
    for r in results:
        print(f"{r['nodes']:>5} {r['per-process']:>11} {r['idle-mb-over-idle']:>17.0f} {r['idle-pss-mb']:>17.0f} "
              f"{r['idle-cores']:>10.3f} {r['peak-mb-over-idle']:>17.0f} {statistics.median(r['round-seconds']):>16.1f} "
              f"{'/'.join(map(str, r['trained'])):>13}")
    target = launch.REPO / "bench" / "results" / "fleet.json"
    target.write_text(json.dumps({"rounds": args.rounds, "results": results}, indent=2))
    print(f"written: {target.relative_to(launch.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
