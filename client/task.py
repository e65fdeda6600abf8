"""What runs in a ClientApp task forked from the warm executor's parent (``client/executor.py``).

The task is Flower's own ``run_clientapp`` (``flwr/supernode/runtime/run_clientapp.py``) with four
changes in the child's copy of that module: it reports its progress to the executor, retries a model's
bytes that have not arrived yet every 50-100 ms, installs the run's FAB one task at a time per host, and
imports this project's modules from the FAB, not from the parent.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

# Flower retries an object that is not uploaded yet after 1 s, 2 s, 4 s, ... (at
# most 500 tries, 2 h). Models arrive within a fraction of a second here, so
# retry every 50-100 ms instead, within the same 2 h limit (``PULL_MAX_TIME``).
OBJECT_PULL_RETRY = {"initial_backoff": 0.05, "backoff_cap": 0.1, "max_tries_per_object": None}
# The package this file belongs to is imported in every child (multiprocessing
# unpickles the task function from it); forget it there so that a FAB's module
# of the same name (``client.client_app``) is imported from the FAB.
_OWN_PACKAGE = (__spec__.name if __spec__ else __name__).split(".")[0]


def run_task(address: str, token: str, certificates: bytes | None, supernode_pid: int | None, reports: Connection) -> None:
    """Child process: run one ClientApp task with Flower's ``run_clientapp``.

    Reports ``{"pid", "ppid"}`` at once, ``{"run", "message-type", "fab"}`` once
    the task's input is pulled and ``{"replied": True}`` once its reply is pushed;
    reporting is best effort (a restarted executor no longer listens) and never
    disturbs the task. The task ends with the SuperNode (``supernode_pid``), not
    with the executor: a task stopped half-way pushes a failed status but no
    reply, and flwr 1.39's SuperNode then waits for that reply for good.
    Exits through Flower's ``flwr_exit``.
    """
    for name in [m for m in sys.modules if m == _OWN_PACKAGE or m.startswith(_OWN_PACKAGE + ".")]:
        del sys.modules[name]

    def report(info: dict) -> None:
        try:
            reports.send(info)
        except OSError:
            pass

    report({"pid": os.getpid(), "ppid": os.getppid(), "parent-cuda": parent_initialised_cuda()})
    from flwr.supernode.runtime import run_clientapp as runtime  # preloaded: no import cost

    pull_task_input, push_message = runtime.pull_task_input, runtime.push_message

    def pull_and_report(client):
        message, context, run, fab = pull_task_input(client)
        report({"run": run.run_id, "message-type": message.metadata.message_type, "fab": fab.hash_str[:12]})
        return message, context, run, fab

    def push_and_report(client, message, context):
        push_message(client, message, context)
        report({"replied": True})

    runtime.pull_task_input, runtime.push_message = pull_and_report, push_and_report  # this child's copy only
    runtime.install_from_fab = one_at_a_time(runtime.install_from_fab)
    # The SuperNode offers the task before it has pulled the message's objects.
    runtime.pull_and_inflate_object_from_tree = functools.partial(
        runtime.pull_and_inflate_object_from_tree, **OBJECT_PULL_RETRY)
    runtime.run_clientapp(
        address, token, insecure=certificates is None, certificates=certificates,
        parent_pid=supernode_pid, runtime_dependency_install=False,
    )


def one_at_a_time(install: Callable) -> Callable:
    """``install`` (Flower's ``install_from_fab``) under an exclusive lock on ``$FLWR_HOME/apps/.install.lock``.

    Flower 1.39 installs a run's FAB into ``$FLWR_HOME/apps/<app>`` at each task's start and takes a folder
    that exists as installed (``validate_and_install`` in ``flwr/cli/install.py``: ``mkdir``, then the files
    moved in). Tasks that start together on one host, as the K SuperNodes of a ``--nodes K`` process do at a
    round's start, would load the app from a half-moved folder ("An exception was raised when attempting to
    load ClientApp"). Under the lock the first installs and the others find the folder complete.
    """
    @functools.wraps(install)
    def locked(*args, **kwargs):
        from flwr.supercore.utils import get_flwr_home

        apps = Path(get_flwr_home()) / "apps"
        apps.mkdir(parents=True, exist_ok=True)
        with open(apps / ".install.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            return install(*args, **kwargs)

    return locked


def parent_initialised_cuda() -> bool:
    """Whether the process this one was forked from had initialised torch's CUDA state (False without torch).

    Read in a freshly forked child: torch marks the child of a parent that had called its CUDA lazy init as a
    "bad fork" (``torch.cuda._is_in_bad_fork``, set by its fork handler), and such a child cannot use the GPU.
    """
    torch = sys.modules.get("torch")
    return bool(torch is not None and (torch.cuda.is_initialized() or torch.cuda._is_in_bad_fork()))


def _report_warm_parent(reports: Connection) -> None:
    reports.send(os.getppid())


def _report_parent_cuda(reports: Connection) -> None:
    reports.send(parent_initialised_cuda())
