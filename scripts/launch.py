"""Start, watch and stop real Flower processes (SuperLink, SuperNodes, `flwr run`).

Used by ``run.sh`` (simulation), the end-to-end tests and the benchmark. Every
process is started in its own session so that stopping it also stops the
ServerApp / ClientApp processes it spawned.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
# Ray's tip about a default it will change (ray/_private/worker.py, on every ray.init()): the
# behaviour it announces is not used here (a ClientApp actor without GPUs must not see one).
RAY_TIP_FILTER = "ignore::FutureWarning:ray._private.worker"
# Flower 1.39's simulation logs these as WARNINGs on every healthy run, so they are left out of the
# streamed log (the SuperLink's log keeps them): the federation size notice, also when the federation
# config sets num-supernodes (flwr/simulation/app.py; the next line gives the real count), and each Ray
# actor's normal shutdown at the end (flwr/simulation/ray_transport/ray_actor.py, `terminate`).
FLOWER_NOTICES = ("Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
                  "Manually terminating ClientAppActor")


@dataclass
class Ports:
    """A SuperLink's listening ports: HTTP (control and runtime APIs) and Fleet (gRPC)."""

    http: int = 8000
    fleet: int = 9092

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.http}"


VENV_BIN = Path(sys.executable).parent


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: this venv's scripts first on PATH (the
    SuperLink spawns `flower-superexec`), telemetry and dependency installs off."""
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    warnings = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), RAY_TIP_FILTER)))
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home), "PATH": path, "PYTHONWARNINGS": warnings}


def bin_path(name: str) -> str:
    """A console script of the running interpreter's environment."""
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else name


def start(cmd: list[str], log_file: Path, env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def stop(processes: Iterable[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each process group, then SIGKILL what is left after ``grace`` seconds."""
    processes = [p for p in processes if p.poll() is None]
    for p in processes:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(p, signal.SIGKILL)
        p.wait()


def crash(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` and everything in its process group, as a host failure would."""
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def start_superlink(flwr_home: Path, ports: Ports, simulation: bool, extra: list[str] = (),
                    ray_address: str = "") -> subprocess.Popen:
    """A SuperLink on 127.0.0.1; waits until its HTTP API answers /health. With ``ray_address`` (HOST:PORT of a
    Ray cluster's head) its simulations join that cluster (Flower's Ray backend calls a plain ``ray.init()``,
    which reads ``RAY_ADDRESS``) instead of starting and stopping one of their own for every run."""
    cmd = [
        bin_path("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(ports.http),
        "--fleet-api-address", f"127.0.0.1:{ports.fleet}", *extra,
    ]
    if simulation:
        cmd.append("--simulation")
    env = {**flower_env(flwr_home), **({"RAY_ADDRESS": ray_address} if ray_address else {})}
    process = start(cmd, flwr_home / "superlink.log", env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {process.returncode}; see {flwr_home / 'superlink.log'}")
        try:
            with urllib.request.urlopen(f"http://{ports.address}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    stop([process])
    raise RuntimeError(f"flower-superlink did not answer on {ports.address} within 60 s")


EXECUTORS = ("warm", "subprocess")


def supernode_command(executor: str = "warm") -> list[str]:
    """How a SuperNode starts: ``warm`` = ``fl-distill-supernode`` (warm executor, short
    polls; ``client/supernode.py``), ``subprocess`` = stock ``flower-supernode`` (a fresh
    ``flwr-clientapp`` process per message, Flower's 3 s polls)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor = {executor!r} is not allowed; use one of {EXECUTORS}")
    return [bin_path("fl-distill-supernode" if executor == "warm" else "flower-supernode")]


def start_supernodes(
    flwr_home: Path, ports: Ports, count: int, first_runtime_port: int, executor: str = "warm",
    node_configs: dict[int, str] | None = None, extra: Iterable[str] = (),
) -> list[subprocess.Popen]:
    """``count`` SuperNodes on 127.0.0.1, node i holding partition i of ``count``, its delivered models in
    ``flwr_home/models-<i>`` (each node its own model folder, as on separate machines); ``node_configs``:
    more node config for node i, e.g. {2: 'model="small"'}; ``extra``: more arguments for every node."""
    return [
        start(
            [*supernode_command(executor), *extra, "--insecure", "--superlink", f"127.0.0.1:{ports.fleet}",
             "--port", str(first_runtime_port + i), "--node-config",
             f"partition-id={i} num-partitions={count} model-dir=\"{flwr_home / f'models-{i}'}\" "
             f"{(node_configs or {}).get(i, '')}".strip()],
            flwr_home / f"supernode-{i}.log", flower_env(flwr_home),
        )
        for i in range(count)
    ]


def start_ray_node(log_file: Path, temp_dir: Path, gcs_port: int, head: bool, num_cpus: int | None = None,
                   dashboard_port: int | None = None) -> subprocess.Popen:
    """One Ray node on 127.0.0.1 (``ray start --block``: its Ray processes share its process group, so
    ``stop`` ends them all): the head listening on ``gcs_port``, else a node joining it. ``temp_dir`` (short:
    Ray's sockets live there) keeps the cluster out of /tmp/ray/ray_current_cluster, which a later plain
    ``ray.init()`` on this host would otherwise join. ``num_cpus``: what the node offers (default: what Ray
    counts on this host, as Flower's own ``ray.init()`` does). The head serves Ray's dashboard and state API only
    with a ``dashboard_port`` (``ray[default]``). Waits until the node says it started."""
    if head:
        role = [f"--port={gcs_port}", f"--temp-dir={temp_dir}"]
        role += (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
                 if dashboard_port else ["--include-dashboard=false"])
    else:
        role = [f"--address=127.0.0.1:{gcs_port}"]
    cmd = [bin_path("ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           *([f"--num-cpus={num_cpus}"] if num_cpus else []), *(["--head"] if head else []), *role]
    offset = log_file.stat().st_size if log_file.exists() else 0
    process = start(cmd, log_file, {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {process.returncode}; see {log_file}")
        if "Ray runtime started" in log_file.read_bytes()[offset:].decode(errors="replace"):
            return process
        time.sleep(0.5)
    stop([process])
    raise RuntimeError(f"`ray start` did not start within 90 s; see {log_file}")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def write_connection(flwr_home: Path, name: str, address: str) -> None:
    """Make ``name`` the default connection in ``$FLWR_HOME/config.toml``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\ninsecure = true\n'
    )


def flwr_run(
    flwr_home: Path, connection: str, run_config: str = "", federation_config: str = "",
    stream: bool = True, app: Path = REPO, echo=print,
) -> int:
    """`flwr run` the app; returns the run ID. With ``stream`` it waits for the run to end."""
    cmd = [bin_path("flwr"), "run", str(app), connection]
    if run_config:
        cmd += ["--run-config", run_config]
    if federation_config:
        cmd += ["--federation-config", federation_config]
    if stream:
        cmd.append("--stream")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flower_env(flwr_home))
    run_id = None
    for line in proc.stdout:
        if any(notice in line for notice in FLOWER_NOTICES):
            continue
        echo(line.rstrip("\n"))
        if "Successfully started run" in line:
            run_id = int(line.split("Successfully started run")[1].split()[0])
    if proc.wait() != 0 or run_id is None:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode})")
    return run_id


def run_status(flwr_home: Path, connection: str, run_id: int) -> str:
    """The run's status as `flwr ls` reports it, e.g. 'finished:completed'."""
    out = subprocess.run(
        [bin_path("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
        capture_output=True, text=True, env=flower_env(flwr_home), check=True,
    ).stdout
    return json.loads(out)["runs"][0]["status"]


def wait_finished(flwr_home: Path, connection: str, run_id: int, timeout: float) -> str:
    """Poll `flwr ls` until the run is finished; returns its final status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run_status(flwr_home, connection, run_id)
        if status.startswith("finished"):
            return status
        time.sleep(2)
    raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s (status {status})")
