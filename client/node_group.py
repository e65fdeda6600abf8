"""Several SuperNodes in one process, their ClientApp tasks forked from one warm parent.

    fl-distill-supernode --nodes K [--first-index F] FLOWER-SUPERNODE-ARGS...     (client/supernode.py)

A host that runs many SuperNodes pays, per node, for a Python process of Flower's SuperNode (grpc,
fastapi, uvicorn, sqlalchemy: about 100 MB) and for its warm executor's parent (torch: about 500 MB).
Here K SuperNodes share both. Each runs Flower's own SuperNode loop (``start_client_internal``) in a
thread of this process, with its own node state, object store, Runtime HTTP API (``--port`` + k),
gRPC connection to the SuperLink, node ID and authentication key; one ``fl-distill-executor`` serves
the K Runtime APIs, forking every task from one warm parent. ``{i}`` in any argument becomes the
node's index F + k: its data (``--node-config "partition-id={i} num-partitions=100"``), its key
(``--auth-supernode-private-key keys/client-{i}.key``), its model folder.

Each node starts as flwr 1.39's ``flower_supernode()`` starts one (``flwr/supernode/cli/flower_supernode.py``):
its arguments parsed by Flower's parser (``_parse_supernode_lifespan_config``), its Runtime HTTP API
started by Flower's ``_start_supernode_http_api``, then ``start_client_internal`` with the same
arguments. What differs:

- Python lets only the main thread set signal handlers, so Flower's are set once, by the main thread, for
  the whole group (SIGTERM or SIGINT stops every node gracefully).
- A node whose connection ends is connected again, alone, after 1 s (doubling to 60 s while it keeps
  ending within a minute): one node's fault never stops its neighbours. Flower's SuperNode loop returns
  when an RPC fails past its retries (e.g. an INTERNAL error from a SuperLink whose SQLite database is
  locked under load: ``flwr/client/grpc_rere_client/connection.py`` logs it and deactivates the node),
  and a new connection the SuperLink refuses at first (the node's last activation not yet expired) ends
  in Flower's ``flwr_exit`` with code 305, which would stop the whole process: in a node's thread it ends
  that node's attempt instead. Any other ``flwr_exit`` code (a configuration error) still stops the
  process, from the main thread, with Flower's message.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
import time
from logging import INFO, WARNING

import flwr.client.grpc_rere_client.connection as fleet_connection
import flwr.supernode.start_client_internal as supernode_loop
from flwr.supercore import log
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.exit.exit_handler import add_exit_handler
from flwr.supercore.telemetry import EventType

NODE_INDEX = re.compile(r"\{i\}")
RETRIED = (ExitCode.SUPERNODE_CONNECTION_ERROR,)  # flwr_exit codes a node's thread retries; others stop the process
_fatal: queue.Queue = queue.Queue()  # (code, message) of a flwr_exit the main thread must carry out


class NodeStopped(Exception):
    """Flower asked to exit from a node's thread (its ``flwr_exit``): that node stops, not the process."""

    def __init__(self, code: int, message: str | None):
        super().__init__(f"exit code {code}: {message}")
        self.code, self.message = code, message


def _exit_from_thread(code: int, message: str | None = None, *args, **kwargs):
    """``flwr_exit`` for Flower's SuperNode modules in a group: as Flower's in the main thread, else
    :class:`NodeStopped` (retried codes) or a request to the main thread to exit."""
    if threading.current_thread() is threading.main_thread():
        flwr_exit(code, message, *args, **kwargs)
    if code not in RETRIED:
        _fatal.put((code, message))
    raise NodeStopped(code, message)


def node_args(flower_args: list[str], index: int, port: int) -> list[str]:
    """One node's ``flower-supernode`` arguments: ``{i}`` replaced by ``index``, ``--port`` set to ``port``."""
    args = [NODE_INDEX.sub(str(index), arg) for arg in flower_args]
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--port":
            skip = True
        elif not arg.startswith("--port="):
            out.append(arg)
    return [*out, "--port", str(port)]


def _parse(args: list[str]):
    """Flower's own parse of one node's arguments (it reads ``sys.argv``; done in the main thread, one at a time)."""
    from flwr.supernode.cli.flower_supernode import _parse_supernode_lifespan_config

    saved, sys.argv = sys.argv, ["flower-supernode", *args]
    try:
        return _parse_supernode_lifespan_config()
    finally:
        sys.argv = saved


def _start(config, name: str) -> threading.Thread:
    """Start one node as ``flower_supernode()`` does: its Runtime HTTP API, then its loop in a daemon thread."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.cli.flower_supernode import _start_supernode_http_api
    from flwr.supernode.nodestate import NodeStateFactory

    state_factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    http_server, http_thread = _start_supernode_http_api(config, state_factory)

    def stop_http_server() -> None:
        http_server.should_exit = True
        http_thread.join(timeout=5)

    add_exit_handler(stop_http_server)
    host = f"[{config.host}]" if ":" in config.host else config.host
    kwargs = dict(
        state_factory=state_factory, server_address=config.server_address, transport=config.transport,
        root_certificates=config.root_certificates, insecure=config.insecure,
        authentication_keys=config.authentication_keys, max_retries=config.max_retries,
        max_wait_time=config.max_wait_time, node_config=config.node_config, isolation=config.isolation,
        runtime_api_address=f"{host}:{config.port}", runtime_certificates=config.runtime_certificates,
        runtime_root_certificates_path=config.runtime_root_certificates_path,
        health_server_address=config.health_server_address, trusted_entities=config.trusted_entities,
        superexec_auth_secret=config.superexec_auth_secret,
        runtime_dependency_install=config.runtime_dependency_install,
    )
    thread = threading.Thread(target=_serve, args=(name, kwargs), name=name, daemon=True)
    thread.start()
    return thread


def _serve(name: str, kwargs: dict) -> None:
    """One node's SuperNode loop, connected again whenever it ends (see the module doc)."""
    wait = 1.0
    while True:
        started = time.monotonic()
        try:
            supernode_loop.start_client_internal(**kwargs)
            reason = "its connection ended"
        except NodeStopped as stop:
            if stop.code not in RETRIED:
                return  # the main thread exits the process
            reason = f"Flower's exit code {stop.code}"
        except Exception as err:  # pylint: disable=broad-exception-caught
            reason = f"{type(err).__name__}: {err}"
        if time.monotonic() - started > 60:  # it ran a while: start the backoff afresh
            wait = 1.0
        log(WARNING, "fl-distill-supernode: %s stopped (%s); connecting it again in %.0f s", name, reason, wait)
        time.sleep(wait)
        wait = min(2 * wait, 60.0)


def run_group(nodes: list[list[str]]) -> None:
    """Run one SuperNode per argument list in ``nodes``, each in a thread of this process; returns never.

    Exits through Flower's ``flwr_exit`` (its exit handlers stop every node's Runtime API): on SIGTERM/SIGINT,
    or with Flower's code and message when a node's thread hits an exit that retrying cannot mend.
    """
    configs = [_parse(args) for args in nodes]  # a bad argument exits here, before any node starts
    register_signal_handlers(event_type=EventType.RUN_SUPERNODE_LEAVE,
                             exit_message=f"{len(nodes)} SuperNodes terminated gracefully.")
    supernode_loop.register_signal_handlers = lambda **_: None  # set once above, by the main thread
    supernode_loop.flwr_exit = fleet_connection.flwr_exit = _exit_from_thread
    for k, config in enumerate(configs):
        _start(config, f"supernode-{k}")
    log(INFO, "fl-distill-supernode: %d SuperNodes in this process, Runtime APIs on ports %s", len(configs),
        ", ".join(str(c.port) for c in configs))
    while True:
        try:
            code, message = _fatal.get(timeout=1)
        except queue.Empty:
            continue  # the signal handlers run in this thread between the waits
        flwr_exit(code, message)
