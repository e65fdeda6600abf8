"""Which nodes a round asks: one snapshot of the connected nodes, after a bounded wait.

Flower 1.39's ``sample_nodes`` (``flwr/serverapp/strategy/strategy_utils.py``)
waits with no deadline until ``min_available_nodes`` are connected, and FedAvg
counts the nodes twice (once for the sample size, once in ``sample_nodes``), so
a node that leaves in between can hang a run too. Here the wait has a deadline,
and the sample is drawn from the one list the wait returned.
"""

from __future__ import annotations

import random
import time
from logging import INFO, WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid


class NoNodesError(RuntimeError):
    """No node connected within ``node-wait-timeout``: the run stops with this message."""


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float, poll: float = 1.0) -> list[int]:
    """The connected node IDs, once ``min_nodes`` are connected or ``timeout`` seconds have passed.

    After the timeout the round goes on with the nodes there are (a WARNING says
    how many, against ``min-nodes``, and what to change). Raises NoNodesError
    when none is connected by then.
    """
    deadline = time.monotonic() + timeout
    next_note = 0.0
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        now = time.monotonic()
        if now >= deadline:
            if not nodes:
                raise NoNodesError(
                    f"no SuperNode connected within node-wait-timeout = {timeout:g} s (min-nodes = {min_nodes}); "
                    "check that SuperNodes reach the SuperLink's Fleet API, or raise node-wait-timeout")
            log(WARNING, "fl-distill: %d node(s) connected after waiting %g s for min-nodes = %d; this round "
                "goes on with them (lower min-nodes, or raise node-wait-timeout, to change this)",
                len(nodes), timeout, min_nodes)
            return nodes
        if now >= next_note:
            log(INFO, "fl-distill: waiting for nodes: %d connected, min-nodes = %d, %.0f s left",
                len(nodes), min_nodes, deadline - now)
            next_note = now + 10
        time.sleep(min(poll, max(0.0, deadline - now)))
    return nodes


def ask_nodes(grid: Grid, nodes: list[int], timeout: float) -> tuple[dict[int, int], dict[int, str]]:
    """({node ID: partition-id}, {node ID: model family}) of the nodes whose own config pins them.

    Asks each node once with a ``query`` message (``client/client_app.py``
    ``report_partition``) and waits at most ``timeout`` seconds. A node that
    pins no partition (or declares no ``model``) is left out of that mapping: the
    server's hand-out (or the run's family assignment) decides. One that sends an
    error (e.g. an older ClientApp with no query handler) or an unexpected reply,
    or does not answer in time, is left out too, with a WARNING naming it: its place
    in the sample order, and so the sample, may then differ between two runs with one seed.
    """
    asks = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY, ttl=timeout) for node in nodes]
    pinned, declared, unclear = {}, {}, []
    answered = set()
    for reply in grid.send_and_receive(asks, timeout=timeout):
        node = reply.metadata.src_node_id
        answered.add(node)
        metrics = None if reply.has_error() else reply.content.metric_records.get("metrics")
        if metrics is None or "partition-id" not in metrics:
            unclear.append(node)
            continue
        if (partition := int(metrics["partition-id"])) >= 0:
            pinned[node] = partition
        if model := str(reply.content.config_records.get("config", {}).get("model", "")):
            declared[node] = model
    if silent := sorted(set(nodes) - answered):
        log(WARNING, "fl-distill: node(s) %s did not say their partition within %g s; the server hands them one, "
            "and the same seed may sample other data in another run", silent, timeout)
    if unclear:
        log(WARNING, "fl-distill: node(s) %s sent an error or no partition-id to the partition query (an older "
            "fl-distill ClientApp?); the server hands them one", sorted(unclear))
    log(INFO, "fl-distill: %d of %d new node(s) pin their partition, %d declare a model family", len(pinned),
        len(nodes), len(declared))
    return pinned, declared


class SimulationRoster:
    """The partitions of a simulation's virtual nodes without asking each: how Flower registered them.

    Flower 1.39's simulation registers its N virtual nodes one by one, node i with node config
    ``partition-id`` = i of ``num-partitions`` = N (``_register_nodes`` in
    ``flwr/server/superlink/fleet/vce/vce_api.py``), into the in-memory LinkState's ``nodes``, a dict, so in
    registration order. Asking every node (:func:`ask_nodes`) costs one ClientApp run each: ~14 ms here, 43 s
    for 3,000 nodes. Called like :func:`ask_nodes`, this asks ``confirm`` of them, drawn with the run's seed,
    and takes every node's partition from that order when each answer agrees with it and none declares a model
    family; otherwise, or for ``confirm`` nodes or fewer, or a node the state does not list, it asks them all.
    """

    def __init__(self, state, seed: int, confirm: int = 8):
        self.state, self.seed, self.confirm = state, seed, confirm

    def __call__(self, grid: Grid, nodes: list[int], timeout: float) -> tuple[dict[int, int], dict[int, str]]:
        order = {node: i for i, node in enumerate(getattr(self.state, "nodes", {}))}
        if len(nodes) <= self.confirm or any(node not in order for node in nodes):
            return ask_nodes(grid, nodes, timeout)
        asked = random.Random(self.seed).sample(sorted(nodes), self.confirm)
        pinned, declared = ask_nodes(grid, asked, timeout)
        if declared or any(pinned.get(node) != order[node] for node in asked):
            log(WARNING, "fl-distill: the simulation's registration order does not give its nodes' partitions "
                "(asked %d: %s against %s); asking every node", len(asked), [pinned.get(n) for n in asked],
                [order[n] for n in asked])
            return ask_nodes(grid, nodes, timeout)
        log(INFO, "fl-distill: the partitions of %d virtual nodes follow the simulation's registration order (%d "
            "asked agree)", len(nodes), len(asked))
        return {node: order[node] for node in nodes}, {}


class SampledGrid:
    """The Grid as the inner strategy sees it while configuring a round: only the sampled nodes.

    Flower's strategies sample in ``configure_train`` with no deadline; shown
    exactly the nodes this wrapper sampled (and built with fraction 1), they
    address all of them at once, and still do their own bookkeeping (FedOpt and
    the DP wrappers keep the round's global model there).
    """

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid, self._node_ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def sample(nodes: list[int], fraction: float, minimum: int, rng: random.Random, out_of: int | None = None) -> list[int]:
    """``fraction`` of ``out_of`` nodes (default: of ``nodes``; at least ``minimum``, at most all of ``nodes``),
    drawn from ``nodes`` with ``rng``.

    The draw picks positions in ``nodes``: given in the same order (by
    partition) and an ``rng`` in the same state, it picks the same data again.
    ``rng`` is the run's own generator, not the ``random`` module's: in
    simulation Ray shares the ServerApp's process and draws from the module's
    generator at times that vary between runs (``ray/_private/gcs_pubsub.py``).
    """
    size = min(len(nodes), sample_size(len(nodes) if out_of is None else out_of, fraction, minimum))
    return rng.sample(nodes, size)


def sample_size(count: int, fraction: float, minimum: int) -> int:
    """How many of ``count`` nodes a round asks: ``fraction`` of them, at least ``minimum``, at most all."""
    return min(count, max(int(count * fraction), minimum))


class TrainingBudget:
    """``dp = "example"``: each partition trains in at most ``rounds`` rounds of a run (``dp-example-rounds``).

    Every client sizes its DP-SGD noise for that many rounds (``client/example_dp.py``) and refuses one more;
    the server asks only partitions with rounds left, so that a round's sample is not spent on refusals. A
    round's size stays ``fraction-train`` of the connected nodes while enough have rounds left, and shrinks
    when fewer do. Kept by partition (the data a node trains), not node ID: two nodes on one partition (more
    nodes than partitions, or two pinning one) share its rounds, since its examples are in both their
    updates, and only one of them trains in a round; a resumed run (``server/checkpoint.py``) goes on
    counting.
    """

    def __init__(self, rounds: int):
        self.rounds = rounds
        self.trained: dict[int, int] = {}  # partition -> rounds it was asked to train in

    def left(self, nodes: list[int], partition_of: dict[int, int]) -> list[int]:
        """Of ``nodes``, one per partition (``partition_of[node]``; the lowest node ID) whose partition has a
        round left: two nodes on one partition would release its examples twice in one round."""
        first: dict[int, int] = {}
        for node in sorted(nodes):
            first.setdefault(partition_of[node], node)
        return sorted(node for partition, node in first.items() if self.trained.get(partition, 0) < self.rounds)

    def charge(self, nodes: list[int], partition_of: dict[int, int]) -> None:
        """``nodes`` were asked to train: one round each, whether or not their reply arrives."""
        for node in nodes:
            self.trained[partition_of[node]] = self.trained.get(partition_of[node], 0) + 1

    def state_dict(self) -> dict:
        return {str(partition): rounds for partition, rounds in self.trained.items()}

    def load_state_dict(self, state: dict) -> None:
        self.trained = {int(partition): int(rounds) for partition, rounds in state.items()}
