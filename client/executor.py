"""A warm ClientApp executor: runs a SuperNode's ClientApp tasks in forked, pre-imported processes.

    fl-distill-executor --runtime-api-address HOST:PORT [--runtime-api-address HOST:PORT ...]
                        [--insecure | --root-certificates CA]
                        [--parent-pid PID] [--poll-interval 0.1] [--idle-poll-interval 1]
                        [--idle-after 30] [--supernode-timeout 30]

It does the job of Flower's ``flower-superexec`` beside a SuperNode started with
``--isolation process``: acquire a ClientApp task from the SuperNode's Runtime API
(``AcquireTask``) and run it. Flower 1.39 starts a fresh ``flwr-clientapp`` process
per message, which imports flwr, torch and torchvision again each time (4-10 s on
a small host). Here each task runs in a process forked from a ``multiprocessing``
forkserver that imported those once (fork: ~20 ms). The task itself is Flower's
own ``flwr.supernode.runtime.run_clientapp.run_clientapp`` (pull the message and
FAB, install the FAB, load the ClientApp, run it, push the reply).

What stays fresh per task: the app's own modules are imported in the child from
the FAB that Flower installed for that run, so a new app version is never served
by stale code; the warm parent only ever imports third-party packages
(``PRELOAD``). The parent never initialises CUDA, so a child can use the GPU.

Given several Runtime API addresses (the SuperNodes of one ``fl-distill-supernode --nodes K`` process),
it serves them all from one warm parent: one copy of the preloaded imports for K nodes.

The executor exits when its SuperNode goes away: at once when ``--parent-pid``
(the SuperNode's PID) ends, or when the Runtime API stays unreachable for
``--supernode-timeout`` seconds. Stopped on its own (SIGTERM/SIGINT), it first
lets running tasks finish; tasks end with the SuperNode, never half-way with
the executor (flwr 1.39's SuperNode would wait for their reply for good). It logs a line per task: run, message type,
seconds, exit code, the PID of the warm parent the task was forked from, and whether that parent had initialised
CUDA (it must not: ``tests/test_gpu.py`` checks it on a GPU).
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import time
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from multiprocessing.connection import Connection

import httpx
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.tls import validate_and_resolve_root_certificates

from client.idle_backoff import IdleBackoff
from client.task import _report_parent_cuda, _report_warm_parent, run_task

# Imported once by the warm parent; every task inherits them. Third-party only:
# the app's modules must come from each run's FAB. Missing ones are skipped.
PRELOAD = (
    "numpy", "torch", "torch.nn", "torch.nn.functional", "torch.optim", "torchvision",
    "torchvision.datasets", "torchvision.transforms", "PIL.Image", "sklearn.datasets",
    "safetensors.torch", "flwr.app", "flwr.clientapp", "flwr.cli.install",
    "flwr.supernode.runtime.run_clientapp",
)
@dataclass
class RunningTask:
    """A task's process, the pipe it reports on, and what it reported."""

    task_id: int
    process: multiprocessing.process.BaseProcess
    reports: Connection
    started: float = field(default_factory=time.perf_counter)
    info: dict = field(default_factory=dict)


class WarmExecutor:
    """Acquire ClientApp tasks from a SuperNode's Runtime API and run each in a forked child."""

    def __init__(self, address: str | list[str], certificates: bytes | None, supernode_pid: int | None = None,
                 preload: tuple[str, ...] = PRELOAD):
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.certificates = certificates
        self.supernode_pid = supernode_pid
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(preload))
        self.running: dict[int, RunningTask] = {}
        self.warm_parent = 0

    def warm_up(self) -> float:
        """Start the forkserver (imports ``PRELOAD``) now rather than at the first task; returns seconds."""
        started = time.perf_counter()
        receive, send = self.context.Pipe(duplex=False)
        child = self.context.Process(target=_report_warm_parent, args=(send,), daemon=True)
        child.start()
        send.close()
        self.warm_parent = receive.recv()
        child.join()
        return time.perf_counter() - started

    def parent_initialised_cuda(self) -> bool:
        """Whether the warm parent has initialised torch's CUDA (then no task could use the GPU), read by a probe
        forked from it (:func:`parent_initialised_cuda`). Call after :meth:`warm_up`."""
        receive, send = self.context.Pipe(duplex=False)
        child = self.context.Process(target=_report_parent_cuda, args=(send,), daemon=True)
        child.start()
        send.close()
        initialised = receive.recv()
        child.join()
        return initialised

    def launch(self, task_id: int, token: str, address: str) -> None:
        """Fork a child of the warm parent that runs task ``task_id`` of the SuperNode at ``address``."""
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=run_task, args=(address, token, self.certificates, self.supernode_pid, send),
            name=f"clientapp-task-{task_id}",
        )
        process.start()
        send.close()
        self.running[task_id] = RunningTask(task_id, process, receive)

    def reap(self) -> None:
        """Log and forget every task whose process has ended."""
        for task in list(self.running.values()):
            while task.reports.poll():
                try:
                    task.info.update(task.reports.recv())
                except EOFError:
                    break
            if task.process.is_alive():
                continue
            task.process.join()
            del self.running[task.task_id]
            info = task.info
            replied = "replied" if info.get("replied") else "NO REPLY"
            warm = "forked from the warm parent" if info.get("ppid") == self.warm_parent else "NOT from the warm parent"
            cuda = {True: "HAD INITIALISED CUDA: no task can use the GPU", False: "CUDA untouched"}.get(
                info.get("parent-cuda"), "CUDA state not reported")  # not reported: the task died at once
            log(INFO if task.process.exitcode == 0 and info.get("replied") and not info.get("parent-cuda") else WARNING,
                "fl-distill-executor: task %d run %s %s: %.2f s, exit %s, %s, pid %s, parent %s (%s; %s)",
                task.task_id, info.get("run", "?"), info.get("message-type", "?"), time.perf_counter() - task.started,
                task.process.exitcode, replied, info.get("pid", "?"), info.get("ppid", "?"), warm, cuda)

    def wait_for_tasks(self) -> None:
        """Let running tasks finish: stopping one half-way would leave its SuperNode waiting for a reply."""
        for task in self.running.values():
            log(INFO, "fl-distill-executor: waiting for task %d to finish", task.task_id)
            task.process.join()
        self.reap()

    def serve(self, polls: IdleBackoff, supernode_timeout: float) -> int:
        """Acquire and run tasks until the SuperNodes are gone, asking each of them in turn and waiting
        ``polls.next_wait()`` between rounds of requests (short while a task was acquired or ran in its last
        ``after`` seconds); returns the exit code. Exits 1 when no SuperNode answered for ``supernode_timeout``."""
        clients = {address: RuntimeHttpClient.from_server_address(
            server_address=address, insecure=self.certificates is None, root_certificates=self.certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")]) for address in self.addresses}
        last_contact = time.monotonic()
        try:
            while True:
                self.reap()
                unreachable = []
                for address, client in clients.items():
                    try:
                        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                        last_contact = time.monotonic()
                    except httpx.TransportError as err:
                        unreachable.append(f"{address} ({err})")
                        continue
                    if res.HasField("task") and res.token:
                        self.launch(res.task.task_id, res.token, address)
                if len(unreachable) == len(clients) and time.monotonic() - last_contact > supernode_timeout:
                    log(ERROR, "fl-distill-executor: no SuperNode's Runtime API has answered for %.0f s (%s); "
                        "exiting", supernode_timeout, "; ".join(unreachable))
                    return 1
                if self.running:
                    polls.work()
                time.sleep(polls.fast if len(unreachable) == len(clients) else polls.next_wait())
        finally:
            for client in clients.values():
                client.close()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fl-distill-executor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api-address", required=True, action="append",
                        help="the SuperNode's Runtime API, HOST:PORT; again for each further SuperNode it serves")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    tls.add_argument("--root-certificates", help="CA certificate (PEM) of the Runtime API's TLS certificate")
    parser.add_argument("--parent-pid", type=int,
                        help="the SuperNode's PID: exit when it ends; running tasks end with it too")
    parser.add_argument("--poll-interval", type=float, default=0.1,
                        help="seconds between AcquireTask calls while tasks come (0.1)")
    parser.add_argument("--idle-poll-interval", type=float, default=1.0,
                        help="seconds between AcquireTask calls once --idle-after seconds passed without a task (1)")
    parser.add_argument("--idle-after", type=float, default=30.0,
                        help="seconds without a task before the polls back off, doubling to --idle-poll-interval (30)")
    parser.add_argument("--supernode-timeout", type=float, default=30.0,
                        help="exit when the Runtime API does not answer for this many seconds (30)")
    args = parser.parse_args(argv)
    if not args.insecure and not args.root_certificates:
        parser.error("give --insecure or --root-certificates CA (TLS to the SuperNode's Runtime API)")
    for address in args.runtime_api_address:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--runtime-api-address = {address!r} is not allowed; use HOST:PORT, "
                         "e.g. 127.0.0.1:9094 ([::1]:9094 for IPv6)")
    if not 0.01 <= args.poll_interval <= 60:
        parser.error(f"--poll-interval = {args.poll_interval} is not allowed; use 0.01 to 60 seconds")
    if not args.poll_interval <= args.idle_poll_interval <= 60:
        parser.error(f"--idle-poll-interval = {args.idle_poll_interval} is not allowed; use --poll-interval "
                     f"({args.poll_interval}) to 60 seconds")
    if not 0 <= args.idle_after <= 3600:
        parser.error(f"--idle-after = {args.idle_after} is not allowed; use 0 to 3600 seconds")
    if args.supernode_timeout <= 0:
        parser.error(f"--supernode-timeout = {args.supernode_timeout} is not allowed; use a number > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGINT explicitly too: a process started in the background by a shell
    # without job control inherits SIGINT ignored, and the SuperNode monitor
    # below stops this process with SIGINT.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # sends this process SIGINT when the SuperNode ends
    executor = WarmExecutor(args.runtime_api_address, certificates, supernode_pid=args.parent_pid)
    try:
        seconds = executor.warm_up()
        log(INFO, "fl-distill-executor: warm parent %d ready in %.1f s (preloaded %s); tasks from %s",
            executor.warm_parent, seconds, ", ".join(PRELOAD), ", ".join(args.runtime_api_address))
        polls = IdleBackoff(args.poll_interval, args.idle_poll_interval, args.idle_after, name="fl-distill-executor")
        return executor.serve(polls, args.supernode_timeout)
    except KeyboardInterrupt:
        log(INFO, "fl-distill-executor: stopping")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not cut the wait short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        executor.wait_for_tasks()
        return 0


if __name__ == "__main__":
    sys.exit(main())
