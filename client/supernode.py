"""A Flower SuperNode with the warm executor beside it and short polls.

    fl-distill-supernode [--executor warm|subprocess] [--idle-poll 0.2] [--task-poll 0.1]
                         [--nodes K [--first-index F]] FLOWER-SUPERNODE-ARGS...

Takes every ``flower-supernode`` argument unchanged and runs Flower's own
``flower_supernode()`` in this process, with two changes:

- ``--executor warm`` (default): the SuperNode runs with ``--isolation process``
  and this process starts ``fl-distill-executor`` (``client/executor.py``) as its
  child, pointed at the SuperNode's Runtime API (``--host``/``--port``; TLS when
  ``--ssl-ca-certfile`` is given), asking for a task every ``--task-poll``
  seconds and watching this PID, so killing the SuperNode stops it too; if the
  executor dies, it is started again. ``--executor subprocess`` keeps Flower's
  default (a fresh ``flwr-clientapp`` process per message; its SuperExec polls
  every 0.2 s).
- ``--nodes K``: K SuperNodes in this process, one thread each, all served by one warm executor
  (``client/node_group.py``): a host running many nodes pays for one warm parent, not K.
- The first connection is checked before anything starts (``client/preflight.py``): nothing
  listening at ``--superlink`` for ``--first-connect-wait`` seconds (unless Flower's
  ``--max-retries``/``--max-wait-time`` asks to retry), ``--insecure`` against a TLS SuperLink,
  a CA that did not sign its certificate, or TLS asked of a plaintext one exits with the cause
  and the flag to change, where ``flower-supernode`` would retry for ever.
- ``--node-config`` is checked before anything starts (``common.config.check_node_config``):
  an unknown key or a bad value (``model-dir`` that is a file, ``device="gpu"``, ``device="cuda"`` where
  no CUDA device is visible) stops it with the reason.
- Short polls that back off when idle: flwr 1.39 hard-codes ``time.sleep(3)`` between the
  SuperNode's pulls when it has no work, and ``time.sleep(0.5)`` while it waits for a
  ClientApp's reply or object (``flwr/supernode/start_client_internal.py``). This launcher
  replaces that module's ``time`` with ``CappedSleep``: the reply wait is capped at
  ``--idle-poll`` seconds, and the idle sleep follows an ``IdleBackoff``
  (``client/idle_backoff.py``): ``--idle-poll`` while a message was pulled or a reply pushed in
  the last ``--idle-after`` seconds, then doubling up to ``--idle-poll-max`` (Flower's 3 s). The
  executor's task poll backs off the same way (``--task-poll`` to ``--task-poll-max``). Its
  retries of a model's bytes that have not arrived yet start at 50 ms, not 1 s
  (``client.task.OBJECT_PULL_RETRY``).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from logging import WARNING
from typing import Any

import click
import flwr.supernode.start_client_internal as supernode_loop
from flwr.common.config import parse_config_args
from flwr.common.constant import FLEET_API_GRPC_RERE_DEFAULT_ADDRESS
from flwr.supercore import log
from flwr.supernode.cli import flower_supernode

from client.task import OBJECT_PULL_RETRY
from client.idle_backoff import IdleBackoff, PerThread
from client.node_group import node_args, run_group
from client.preflight import PreflightError, check_superlink
from common.config import ConfigError, check_node_config

FLOWER_RUNTIME_PORT = 9094  # flower-supernode's default --port


FLOWER_IDLE_SLEEP = 3  # flwr 1.39's time.sleep(3) after a pull that found no message


class CappedSleep:
    """``time`` as a module, except for ``sleep(s)``: Flower's idle sleep (3 s) waits
    ``idle.next_wait()`` when an ``IdleBackoff`` is given, every other sleep ``min(s, cap)``."""

    def __init__(self, cap: float, idle: IdleBackoff | None = None):
        self.cap, self.idle = cap, idle

    def sleep(self, seconds: float) -> None:
        if self.idle is not None and seconds >= FLOWER_IDLE_SLEEP:
            time.sleep(self.idle.next_wait())
        else:
            time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def noticing_work(step: Callable[..., Any], idle: IdleBackoff,
                  worked: Callable[[Any], bool] = lambda _result: True) -> Callable[..., Any]:
    """``step`` (a function of Flower's SuperNode loop), telling ``idle`` of work when ``worked(its result)``."""

    @functools.wraps(step)
    def noticed(*args, **kwargs):
        result = step(*args, **kwargs)
        if worked(result):
            idle.work()
        return result

    return noticed


def _option(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``args`` (last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def runtime_address(flower_args: list[str]) -> str:
    """HOST:PORT of the Runtime API of a SuperNode started with ``flower_args``, as a client on this host reaches it."""
    host = _option(flower_args, "--host") or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{_option(flower_args, '--port') or FLOWER_RUNTIME_PORT}"


def executor_command(flower_args: list[str], supernode_pid: int, task_poll: float = 0.1, task_poll_max: float = 1.0,
                     idle_after: float = 30.0, more_nodes: list[list[str]] = ()) -> list[str]:
    """The ``fl-distill-executor`` command for a SuperNode started with ``flower_args`` (and for the SuperNodes
    of ``more_nodes``, with their arguments, in the same process: one executor serves them all)."""
    ca = _option(flower_args, "--ssl-ca-certfile")
    tls = ["--root-certificates", ca] if ca else ["--insecure"]
    addresses = [arg for args in (flower_args, *more_nodes) for arg in ("--runtime-api-address", runtime_address(args))]
    return [sys.executable, "-m", "client.executor", *addresses,
            "--parent-pid", str(supernode_pid), "--poll-interval", str(task_poll),
            "--idle-poll-interval", str(task_poll_max), "--idle-after", str(idle_after), *tls]


def supervise(command: list[str]) -> threading.Thread:
    """Run ``command`` (the executor) and start it again whenever it exits.

    A SuperNode without its executor would take tasks it never runs. Tasks that
    were running go on (they end with the SuperNode, not the executor). Restarts
    wait 1 s, doubling up to 60 s while the executor keeps dying within 30 s of
    its start. A daemon thread: it ends with this process, and the executor
    follows (``--parent-pid``).
    """

    def keep_running() -> None:
        delay = 1.0
        while True:
            started = time.monotonic()
            code = subprocess.Popen(command).wait()  # pylint: disable=consider-using-with
            delay = 1.0 if time.monotonic() - started > 30 else min(2 * delay, 60.0)
            log(WARNING, "fl-distill-supernode: the executor exited with code %s; starting it again in %.0f s", code, delay)
            time.sleep(delay)

    thread = threading.Thread(target=keep_running, name="executor-supervisor", daemon=True)
    thread.start()
    return thread


def preflight(flower_args: list[str], wait: float) -> None:
    """Exit with the cause if the first connection ``flower_args`` describe cannot succeed (see module doc)."""
    insecure, ca = "--insecure" in flower_args, _option(flower_args, "--root-certificates")
    if wait == 0 or (insecure and ca):  # off, or Flower's own "Conflicting options" exit says it
        return
    retrying = any(_option(flower_args, flag) is not None for flag in ("--max-retries", "--max-wait-time"))
    address = _option(flower_args, "--superlink") or FLEET_API_GRPC_RERE_DEFAULT_ADDRESS
    try:
        check_superlink(address, insecure=insecure, root_certificates=ca, wait=wait, fail_if_absent=not retrying)
    except (PreflightError, ValueError) as err:
        sys.exit(f"fl-distill-supernode: cannot start: {err}")


CUDA_PROBE = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"


@functools.cache
def _probe(code: str) -> subprocess.CompletedProcess:
    """``code`` run by this Python in a child process, once per process (``--nodes`` checks every node)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def check_cuda_visible(node_config: dict) -> None:
    """With ``device="cuda"`` in the node config, exit at start unless torch sees a CUDA device here.

    Asked of a short-lived child process (~3 s, only for ``cuda``): this process does not import torch, and
    ``torch.cuda.is_available()`` initialises the CUDA driver in the process that calls it.
    """
    if node_config.get("device") != "cuda":
        return
    probe = _probe(CUDA_PROBE)
    if probe.returncode == 3:
        sys.exit("fl-distill-supernode: cannot start: node config device = 'cuda' but no CUDA device is visible "
                 "here (torch.cuda.is_available() is false: no NVIDIA GPU, driver or CUDA build of torch); "
                 "use device=\"auto\" or device=\"cpu\"")
    if probe.returncode != 0:  # torch itself failed: say how, not that the GPU is missing
        last = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
        sys.exit(f"fl-distill-supernode: cannot start: node config device = 'cuda', but asking torch whether a "
                 f"CUDA device is visible failed: {last}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fl-distill-supernode", add_help=False, usage="%(prog)s [OPTIONS] FLOWER-SUPERNODE-ARGS...",
        description="Flower's SuperNode with a warm ClientApp executor and short polls (client/supernode.py). "
                    "Every other argument goes to flower-supernode; its own help follows.")
    parser.add_argument("--executor", choices=("warm", "subprocess"), default="warm",
                        help="warm: tasks in processes forked from a pre-imported parent (default); "
                             "subprocess: Flower's flwr-clientapp process per message")
    parser.add_argument("--idle-poll", type=float, default=0.2,
                        help="seconds between the SuperNode's polls for work while work comes, and its cap on "
                             "Flower's 0.5 s reply wait (0.2)")
    parser.add_argument("--idle-poll-max", type=float, default=3.0,
                        help="the SuperNode's poll interval once --idle-after seconds passed without a message "
                             "(3 = Flower's own; = --idle-poll: no backoff)")
    parser.add_argument("--task-poll", type=float, default=0.1,
                        help="seconds between the executor's requests for a task while tasks come (0.1)")
    parser.add_argument("--task-poll-max", type=float, default=1.0,
                        help="the executor's task poll interval once --idle-after seconds passed without a task (1)")
    parser.add_argument("--idle-after", type=float, default=30.0,
                        help="seconds without work before the polls back off, doubling to their max (30)")
    parser.add_argument("--nodes", type=int, default=1,
                        help="run this many SuperNodes in this process, their tasks forked from one warm parent "
                             "(client/node_group.py): node k gets Runtime API port --port + k, and {i} in any "
                             "argument becomes its index, --first-index + k (1)")
    parser.add_argument("--first-index", type=int, default=0, help="the first node's {i} with --nodes (0)")
    parser.add_argument("--first-connect-wait", type=float, default=20.0,
                        help="seconds to wait at start for the SuperLink to accept a connection before exiting "
                             "with the cause (20; 0 skips the start check)")
    ours, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    asking_help = "-h" in flower_args or "--help" in flower_args
    if asking_help:
        parser.print_help()
        print()
    if not 0.01 <= ours.idle_poll <= 3:
        parser.error(f"--idle-poll = {ours.idle_poll} is not allowed; use 0.01 to 3 seconds (3 = Flower's own)")
    if not 0.01 <= ours.task_poll <= 60:
        parser.error(f"--task-poll = {ours.task_poll} is not allowed; use 0.01 to 60 seconds")
    if not ours.idle_poll <= ours.idle_poll_max <= 60:
        parser.error(f"--idle-poll-max = {ours.idle_poll_max} is not allowed; use --idle-poll ({ours.idle_poll}) "
                     "to 60 seconds")
    if not ours.task_poll <= ours.task_poll_max <= 60:
        parser.error(f"--task-poll-max = {ours.task_poll_max} is not allowed; use --task-poll ({ours.task_poll}) "
                     "to 60 seconds")
    if not 0 <= ours.idle_after <= 3600:
        parser.error(f"--idle-after = {ours.idle_after} is not allowed; use 0 to 3600 seconds")
    if not 0 <= ours.first_connect_wait <= 600:
        parser.error(f"--first-connect-wait = {ours.first_connect_wait} is not allowed; use 0 (no check) to 600 s")
    if not 1 <= ours.nodes <= 1000 or ours.first_index < 0:
        parser.error(f"--nodes = {ours.nodes} --first-index = {ours.first_index} is not allowed; use 1 to 1000 "
                     "nodes and a first index >= 0")
    if ours.nodes > 1 and (ours.executor != "warm" or _option(flower_args, "--health-server-address")):
        parser.error(f"--nodes {ours.nodes} runs its SuperNodes with one warm executor and no health server; "
                     "drop --executor subprocess and --health-server-address, or use --nodes 1")
    port = int(_option(flower_args, "--port") or FLOWER_RUNTIME_PORT)
    nodes = [node_args(flower_args, ours.first_index + k, port + k) for k in range(ours.nodes)]
    for args in nodes:
        _check_node_config(parser, args, asking_help)
    isolation = _option(flower_args, "--isolation")
    if ours.executor == "warm" and isolation not in (None, "process"):
        parser.error(f"--isolation {isolation} does not go with --executor warm; "
                     "drop --isolation, or use --executor subprocess for Flower's own isolation")
    if ours.executor == "subprocess" and isolation not in (None, "subprocess"):
        parser.error(f"--isolation {isolation} with --executor subprocess would start no executor; "
                     "drop --isolation, or use --executor warm")
    if not asking_help:
        preflight(nodes[0], ours.first_connect_wait)
    if ours.executor == "warm":
        if isolation is None:
            nodes = [[*args, "--isolation", "process"] for args in nodes]
        if not asking_help:
            supervise(executor_command(nodes[0], os.getpid(), ours.task_poll, ours.task_poll_max,
                                       ours.idle_after, more_nodes=nodes[1:]))
    else:
        os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")

    def backoff(name: str = "fl-distill-supernode") -> IdleBackoff:
        return IdleBackoff(ours.idle_poll, ours.idle_poll_max, ours.idle_after, name=name)

    idle = backoff() if ours.nodes == 1 else PerThread(lambda thread: backoff(f"fl-distill-supernode {thread}"))
    supernode_loop.time = CappedSleep(ours.idle_poll, idle)
    # work: a pulled message (its run ID back), and a pushed reply (idle time counts from there)
    supernode_loop._pull_and_store_message = noticing_work(supernode_loop._pull_and_store_message, idle,
                                                           worked=lambda run_id: run_id is not None)
    supernode_loop._push_messages = noticing_work(supernode_loop._push_messages, idle)
    supernode_loop.pull_objects = functools.partial(supernode_loop.pull_objects, **OBJECT_PULL_RETRY)
    sys.argv = ["flower-supernode", *nodes[0]]  # Flower names its telemetry event after argv[0]
    if ours.nodes > 1:
        run_group(nodes)
    flower_supernode()


def _check_node_config(parser: argparse.ArgumentParser, flower_args: list[str], asking_help: bool) -> None:
    """Refuse a bad ``--node-config`` at start, not at the first message (a parser error naming it)."""
    node_config = _option(flower_args, "--node-config")
    if node_config is None:
        return
    try:
        parsed = parse_config_args([node_config])
        check_node_config(parsed)
    except (ConfigError, ValueError, click.ClickException) as err:
        parser.error(f"--node-config {node_config!r}: {getattr(err, 'message', err)}")
    if not asking_help:
        check_cuda_visible(parsed)


if __name__ == "__main__":
    main()
