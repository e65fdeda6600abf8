"""The strategy the ServerApp runs: Flower's aggregation wrapped in sampling, validation, clipping and distillation.

One round's replies go through the layers of ``../shared/notes/strategy-layers.md``
in this order: validate (``server/validation.py``) → clip (``max-update-norm``)
→ aggregate (the Flower strategy ``aggregation`` chose, ``server/aggregation.py``)
→ distil (``server/distillation.py``). As Flower's own DP strategies do
(``flwr/serverapp/strategy/dp_fixed_clipping.py``), this class holds the inner
strategy and delegates to it, so a new aggregation needs no new class here.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedTrimmedAvg, Strategy

from common.config import ConfigError
from common.model_families import pack, unpack
from server.distillation import ServerDistillation
from server.families import ModelFamilies, family_roster, family_stats
from server.fusion_check import Asked, FusionCheck
from server.privacy import dp_sgd_rounds
from server.sampling import SampledGrid, TrainingBudget, ask_nodes, sample, sample_size, wait_for_nodes
from server.validation import OWN_DATA, ExampleCounts, clip_update


def content_digest(reply: Message) -> bytes:
    """SHA-256 of a reply's arrays: a sort key that depends neither on arrival order nor on node IDs.

    Float sums depend on their order, so FedAvg over the same client models in
    another order gives another model. Node IDs are new in every run (and in
    simulation the node's own ``partition-id`` decides its data), so only the
    content itself orders the same updates the same way in every run.
    """
    digest = hashlib.sha256()
    for record in reply.content.array_records.values():
        for name, array in record.items():
            digest.update(name.encode())
            digest.update(array.data)
    return digest.digest()


class DistillStrategy(Strategy):
    """Sampling, reply validation, update clipping and distillation around a Flower aggregation strategy.

    Args:
        aggregator: the Flower strategy that aggregates (``FedAvg``, ``FedTrimmedAvg``,
            ``FedMedian``, …), built to use every node it is shown, or :class:`server.families.ModelFamilies`,
            one such strategy per model family (a lone strategy is the family ``large``'s).
        distillation: the server's distillation, or None for ``distill = 'off'``.
        fraction_train, fraction_evaluate, min_nodes: as the run-config keys.
        num_partitions: partitions of the clients' pool; 0 = one per node connected in round 1.
        node_wait_timeout: seconds to wait for ``min_nodes`` before a round goes on with fewer.
        round_timeout: seconds; also each instruction's TTL, so a slow node skips stale rounds.
        max_update_norm: L2 bound on each client update (model − global model); 0 = no clipping.
        round_offset: rounds already done by the run this one resumes; Flower's round r is round r + offset.
        sampling_seed: seeds ``rng``, this run's generator for sampling nodes (its state is checkpointed).
        fusion_check: the clients' check of a fuse-back (``fusion-check = 'clients'``), or None: the
            Distiller's proxy criterion alone decides.
        example_counts: the check of each reply's ``num-examples`` against its partition's size, and the cap
            on claims from clients on their own data (``server/validation.py``); None: no check.
        roster: how new nodes are asked their pinned partition and declared family, called as
            :func:`server.sampling.ask_nodes` (a simulation's: :class:`server.sampling.SimulationRoster`).

    Each node is told which partition of the pool is its own: a node whose config
    pins a ``partition-id`` keeps it, the others (docker-compose replicas), sorted
    by ID, get the free ones, so they still train on distinct data. A round that
    samples a fraction draws from the nodes in partition order, not by node ID
    (new in every run), so a seed samples the same data in every run. Replies are aggregated in the order of
    their content (:func:`content_digest`), not of arrival, so a seed repeats a run. Per-round timings, client
    metrics, failures and rejections land in ``round_stats`` (keyed by true round).
    """

    def __init__(self, aggregator: Strategy, distillation: ServerDistillation | None = None, *,
                 fraction_train: float = 1.0, fraction_evaluate: float = 0.0, min_nodes: int = 1,
                 num_partitions: int = 0, node_wait_timeout: float = 300.0, round_timeout: float | None = None,
                 max_update_norm: float = 0.0, round_offset: int = 0, sampling_seed: int | None = None,
                 fusion_check: FusionCheck | None = None, example_counts: ExampleCounts | None = None,
                 budget: TrainingBudget | None = None, roster=ask_nodes):
        super().__init__()
        self.aggregator = aggregator if isinstance(aggregator, ModelFamilies) else ModelFamilies({"large": aggregator})
        self.distillation = distillation
        self.fraction_train, self.fraction_evaluate, self.min_nodes = fraction_train, fraction_evaluate, min_nodes
        self.num_partitions = num_partitions
        self.node_wait_timeout = node_wait_timeout
        self.round_timeout = round_timeout
        self.max_update_norm = max_update_norm
        self.round_offset = round_offset
        self.rng = random.Random(sampling_seed)
        self.roster = roster
        self.partition_of: dict[int, int] = {}
        self.left_out: set[int] = set()  # nodes that declared a model family this run does not federate
        self._families_checked = False  # small-partitions checked against the partitions (first hand-out)
        self.record_partitions: frozenset[int] = frozenset()  # record-updates: partitions whose updates are kept
        self.recorded: dict[int, ArrayRecord] = {}  # this round's valid updates of those partitions
        self.round_stats: dict[int, dict] = {}
        self.fusion_check = fusion_check
        self.example_counts = example_counts
        self.budget = budget  # dp = 'example': the rounds each partition may still train
        self.global_arrays: ArrayRecord | None = None  # what this round sent: replies are checked against it
        self._grid: Grid | None = None  # this round's, for the fusion check's messages
        self._round_started = self._node_wait = 0.0
        self._sampled: set[int] = set()  # this round's nodes asked to train

    def partition_state(self) -> dict:
        """The partition hand-out, for a resumed run to give each node the same data (``server/checkpoint.py``)."""
        return {"partition-of": {str(node): p for node, p in self.partition_of.items()},
                "num-partitions": self.num_partitions,
                "family-of": {str(node): f for node, f in self.aggregator.family_of.items()},
                "left-out": sorted(self.left_out),
                **({"example-rounds": self.budget.state_dict()} if self.budget else {})}

    def load_partition_state(self, state: dict) -> None:
        """Restore :meth:`partition_state` (an empty dict: nothing handed out yet)."""
        if state:
            self.partition_of = {int(node): p for node, p in state["partition-of"].items()}
            self.num_partitions = int(state["num-partitions"])
            self.aggregator.family_of.update({int(node): f for node, f in state.get("family-of", {}).items()})
            self.left_out.update(int(node) for node in state.get("left-out", []))
            if self.budget:
                self.budget.load_state_dict(state.get("example-rounds", {}))

    def placements(self, grid: Grid) -> dict[int, tuple[int, int]]:
        """{node ID: (partition, num-partitions)} of every connected node; new nodes are handed one first."""
        connected = sorted(grid.get_node_ids())
        self._hand_out_partitions(grid, connected)
        return {node: (self.partition_of[node] % self.num_partitions, self.num_partitions) for node in connected}

    def summary(self) -> None:
        log(INFO, "\t├── fl-distill: training %g%% of the nodes a round (at least min-nodes %d), validation, clipping %s, "
            "distillation %s, model families %s, around:", 100 * self.fraction_train, self.min_nodes,
            self.max_update_norm or "off", "on" if self.distillation else "off", ", ".join(self.aggregator.families))
        self.aggregator.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        self.global_arrays, self._grid = arrays, grid
        if self.fraction_train == 0.0:
            return []
        return self._instructions(server_round, arrays, config, grid, self.aggregator.configure_train,
                                  MessageType.TRAIN, self.fraction_train, self.min_nodes)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        return self._instructions(server_round, arrays, config, grid, self.aggregator.configure_evaluate,
                                  MessageType.EVALUATE, self.fraction_evaluate, 1)

    def _instructions(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                      configure, message_type: str, fraction: float, minimum: int) -> list[Message]:
        """The inner strategy's messages to the sampled nodes, each with its partition, the true round and a TTL."""
        waited = time.perf_counter()
        connected = wait_for_nodes(grid, self.min_nodes, self.node_wait_timeout)
        self._hand_out_partitions(grid, connected)
        connected = [node for node in connected if node not in self.left_out]
        self._node_wait = time.perf_counter() - waited  # includes asking new nodes their partition
        budgeted = message_type == MessageType.TRAIN and self.budget is not None
        if budgeted:  # which data each node trains: its partition's rounds are the budget
            data = {node: self.partition_of[node] % self.num_partitions for node in connected}
        candidates = self.budget.left(connected, data) if budgeted else connected
        # Sampled in partition order, not by node ID (new in every run): a seed repeats which data trains.
        chosen = sample(sorted(candidates, key=lambda node: (self.partition_of[node], node)), fraction, minimum,
                        self.rng, out_of=len(connected))
        log(INFO, "%s: sampled %d nodes (out of %d%s)", message_type, len(chosen), len(connected),
            f"; {len(candidates)} with dp-example-rounds left" if budgeted else "")
        if budgeted and len(chosen) < (wanted := sample_size(len(connected), fraction, minimum)):
            log(WARNING, "fl-distill: round %d trains %d nodes, not %d: only %d partitions have a round left of "
                "dp-example-rounds = %d (each client's DP budget); raise it, or lower fraction-train or "
                "num-server-rounds", server_round + self.round_offset, len(chosen), wanted, len(candidates),
                self.budget.rounds)
        if message_type == MessageType.TRAIN:
            self._sampled = set(chosen)  # a node sampled to train is no idle node, even if its reply failed
            if budgeted:
                self.budget.charge(chosen, data)
        messages = []
        for message in configure(server_round, arrays, config, SampledGrid(grid, chosen)):
            node = message.metadata.dst_node_id
            partition = self.partition_of[node] % self.num_partitions
            content = RecordDict(dict(message.content.items()))
            for key, record in message.content.config_records.items():
                content[key] = ConfigRecord({**dict(record), "server-round": server_round + self.round_offset,
                                             "partition-id": partition, "num-partitions": self.num_partitions})
            messages.append(Message(content=content, dst_node_id=node, message_type=message_type,
                                    ttl=self.round_timeout))
        return messages

    def _hand_out_partitions(self, grid: Grid, connected: list[int]) -> None:
        """Record a partition for every connected node not seen before.

        A node's own ``partition-id`` wins (asked with :func:`server.sampling.ask_nodes`
        when either phase samples a fraction of the nodes, since only then does
        the order matter, or when the run has several model families); the others,
        sorted by ID, get the lowest partitions no
        connected node has, and once all are taken share one (numbers past
        ``num_partitions`` wrap around) rather than get none. Two nodes that pin
        one partition are ordered by node ID. Then each new node's model family
        (:meth:`ModelFamilies.assign`); a node that declares a family this run does
        not federate is left out of every round, with a WARNING naming it.
        """
        new = [node for node in connected if node not in self.partition_of]
        if not new:
            return
        sampling = self.fraction_train < 1.0 or 0.0 < self.fraction_evaluate < 1.0
        # Ask each node its pinned partition wherever the partition decides something: sampling, a family,
        # which updates record-updates keeps (a simulated node trains its node config's partition-id).
        asking = sampling or len(self.aggregator.families) > 1 or bool(self.record_partitions)
        pinned, declared = self.roster(grid, new, min(self.round_timeout or 60.0, 60.0)) if asking else ({}, {})
        self.num_partitions = self.num_partitions or len(connected)
        self.partition_of.update(pinned)
        # Only connected nodes hold a partition: a resumed run's old node IDs free theirs.
        holders = sum(node in self.partition_of for node in connected)
        taken = {self.partition_of[node] for node in connected if node in self.partition_of}
        free = (p for p in range(self.num_partitions) if p not in taken)
        for node in (node for node in new if node not in pinned):
            self.partition_of[node] = next(free, holders)
            holders += 1
        for node in new:
            family = self.aggregator.assign(node, declared.get(node), self.partition_of[node] % self.num_partitions)
            if family not in self.aggregator.families:
                self.left_out.add(node)
                log(WARNING, "fl-distill: node %d declares model = %r, which this run does not federate "
                    "(model-families = %s); it is left out of every round", node, family,
                    ",".join(self.aggregator.families))
        if len(self.aggregator.families) > 1:
            self._check_families([node for node in connected if node not in self.left_out])

    def _check_families(self, nodes: list[int]) -> None:
        """Log which node trains which family; warn of a family no node trains. The first time, when the
        number of partitions is fixed, a ``small-partitions`` number past it is an error (it would be ignored)."""
        small = self.aggregator.small_partitions
        if not self._families_checked and small and max(small) >= self.num_partitions:
            raise ConfigError(f"run config 'small-partitions' names partition {max(small)}, but this run has "
                              f"partitions 0 to {self.num_partitions - 1} (num-partitions = {self.num_partitions}: "
                              "set in the run config, by the simulation's clients, or one per node connected in "
                              "round 1); name partitions below it")
        self._families_checked = True
        line, warnings = family_roster(self.aggregator, self.partition_of, nodes, self.num_partitions)
        log(INFO, "fl-distill: model families: %s", line)
        for warning in warnings:
            log(WARNING, "fl-distill: %s", warning)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop bad updates, clip the rest, aggregate them, then distil (and maybe fine-tune) on the proxy set.

        Each reply is checked against the global model this round sent; a
        rejected one is logged with its node and reason. With ``max_update_norm``
        > 0 each update (client model − global model) is scaled to at most that
        L2 norm. With no valid reply the aggregator returns no arrays: the
        previous global model stays and distillation is skipped.
        """
        replies = list(replies)
        if self.global_arrays is None:
            raise RuntimeError("aggregate_train before configure_train: no global model to check replies against")
        true_round = server_round + self.round_offset
        families = self.aggregator
        families.sent = unpack(self.global_arrays, families.families)  # what this round sent, per family
        valid, errors, rejected = families.screen(replies)
        capped: list[dict] = []
        named = {r.metadata.src_node_id: int(next(iter(r.content.metric_records.values())).get("partition-id", OWN_DATA))
                 for r in valid}  # the partition each client says it trained, for metrics.jsonl
        if self.example_counts is not None:  # num-examples against the partition's size; own data capped
            valid, miscounted, capped = self.example_counts.check(valid, self.num_partitions,
                                                                  families.weighted_by_key)
            rejected += miscounted
        for cap in capped:
            log(WARNING, "fl-distill: round %d: node %d claims %d examples of its own data; counted as %d "
                "(max-examples-ratio x the round's median claim)", true_round, cap["node-id"], cap["claimed"],
                cap["counted"])
        for rejection in rejected:
            log(WARNING, "fl-distill: round %d: dropped the update of node %d: %s",
                true_round, rejection.node_id, rejection.reason)
        valid.sort(key=content_digest)
        clipped = []
        if self.max_update_norm > 0:
            for reply in valid:
                reference = families.sent[families.family(reply.metadata.src_node_id)]
                if (norm := clip_update(reply, reference, self.max_update_norm)) > self.max_update_norm:
                    clipped.append({"node-id": reply.metadata.src_node_id, "norm": norm})
        for family, group in families.by_family(valid).items():
            strategy = families.strategies[family]
            if isinstance(strategy, FedTrimmedAvg) and int(strategy.beta * len(group)) == 0:
                log(WARNING, "fl-distill: trimmed-mean-beta = %g trims nothing from %d updates (it cuts int(beta * "
                    "%d) = 0 from each end); %s", strategy.beta, len(group), len(group),
                    f"raise it to at least {1 / len(group):.3g}" if len(group) > 2 else
                    "trimming needs 3 or more updates")
        key = families.arrayrecord_key
        mixed = len(families.families) > 1
        # Robust aggregators take the arrays out of the replies, DP rewrites the weights: read them first.
        client_arrays = [(families.family(r.metadata.src_node_id), ArrayRecord(dict(r.content[key].items())))
                         for r in valid]
        if self.record_partitions:  # record-updates: what these clients sent, as the server received it
            held = {r.metadata.src_node_id: arrays for r, (_, arrays) in zip(valid, client_arrays)}
            self.recorded = {p: arrays for node, arrays in held.items()
                             if (p := self.partition_of[node] % self.num_partitions) in self.record_partitions}
        clients = [{"node-id": r.metadata.src_node_id,
                    "partition-id": named[r.metadata.src_node_id],
                    **dict(next(iter(r.content.metric_records.values()))),
                    **({"model-family": families.family(r.metadata.src_node_id)} if mixed else {})} for r in valid]
        arrays, metrics = families.aggregate_train(server_round, valid + errors)
        stats: dict = {
            "train-seconds": time.perf_counter() - self._round_started,
            "node-wait-seconds": self._node_wait,
            "heard-from": sorted(r.metadata.src_node_id for r in replies if not r.has_error()),
            "failures": len(errors),
            "rejected": [r.to_dict() for r in rejected],
            "clipped": clipped,
            "capped-examples": capped,
            "client-metrics": dict(metrics) if metrics is not None else {},
            "clients": clients,
            "aggregated": arrays is not None,
        }
        if released := dp_sgd_rounds(replies):  # dp = 'example': every reply that left a node, rejected ones too
            stats["dp-replies"] = released
        if mixed:
            stats["families"] = family_stats(families, replies, valid)
        if arrays is not None and self.distillation is not None:
            averaged = unpack(arrays, families.families)
            # The clients score the averaged model while the server distils (server/fusion_check.py)
            early = ({family: self._ask_averaged(true_round, family, averaged[family], clients)
                      for family in families.aggregated} if self.distillation.fuses_back else {})
            fused, stats["distill"] = self.distillation.run(averaged, client_arrays, families.aggregated)
            if self.distillation.fuses_back:
                for family in families.aggregated:
                    learner = stats["distill"]["families"][family] if mixed else stats["distill"]["global"]
                    fused[family], verdict = self._keep(true_round, family, averaged[family], fused[family],
                                                        learner, clients, early[family])
                    if family == families.families[0]:
                        stats["fusion"] = verdict
                    if mixed:
                        stats["families"][family]["fusion"] = verdict
            arrays = pack(fused)
        self.round_stats[true_round] = stats
        return arrays, metrics

    def _received(self, family: str, clients: list[dict]) -> dict[int, dict]:
        """{node: its train reply metrics} of this round's clients of ``family``: those the fusion check may ask."""
        return {c["node-id"]: c for c in clients if self.aggregator.family(c["node-id"]) == family}

    def _ask_averaged(self, true_round: int, family: str, averaged: ArrayRecord, clients: list[dict]) -> Asked | None:
        """Send ``family``'s averaged model to the nodes its fusion check samples, before distillation: of
        ``family``'s connected nodes not sampled to train this round (``fusion-check-nodes = 'idle'``, when
        there are at least ``min-nodes``), else of this round's clients of ``family`` with a valid reply; what
        was asked, or None without a check."""
        if self.fusion_check is None or self._grid is None:
            return None
        received = self._received(family, clients)
        connected = self.placements(self._grid)
        placements = {node: place for node, place in connected.items() if node in received}
        if self.fusion_check.from_idle:  # out of sample: nodes of the family not sampled to train this round
            idle = {node: place for node, place in connected.items() if node not in self._sampled
                    and node not in self.left_out and self.aggregator.family(node) == family}
            if len(idle) >= self.fusion_check.min_nodes:  # fewer: the round's clients check, as with 'trained'
                placements = idle
        nodes = self.fusion_check.nodes(placements, true_round)
        return self.fusion_check.ask(self._grid, nodes, placements, true_round, {"averaged": averaged}, family)

    def _keep(self, true_round: int, family: str, averaged: ArrayRecord, fused: ArrayRecord, distilled: dict,
              clients: list[dict], early: Asked | None = None) -> tuple[ArrayRecord, dict]:
        """``family``'s next global model and the verdict that chose it (``server/fusion_check.py``).

        Without a fusion check the Distiller's proxy criterion decides (kept step 0: the averaged model).
        With one, the nodes :meth:`_ask_averaged` chose score the averaged model (asked before distillation:
        ``early``), the fused one unless the Distiller kept step 0 (asked now, of the same nodes); when they are
        this round's clients of ``family`` (``clients``: their train reply metrics), the model the round started
        from too.
        """
        proxy_choice = "averaged" if distilled.get("kept-step") == 0 else "fused"
        if self.fusion_check is None or self._grid is None:
            return (averaged if proxy_choice == "averaged" else fused), {"kept": proxy_choice, "by": "proxy"}
        started = time.perf_counter()
        first = early or self._ask_averaged(true_round, family, averaged, clients)
        asked = [first]
        if proxy_choice == "fused":  # the same nodes, the same partitions
            asked.append(self.fusion_check.ask(self._grid, list(first.placements), first.placements, true_round,
                                               {"fused": fused}, family))
        verdict = self.fusion_check.collect(self._grid, asked, true_round, proxy_choice,
                                            self._received(family, clients), family,
                                            named=len(self.aggregator.families) > 1, started=started)
        previous = self.aggregator.sent[family]
        return {"averaged": averaged, "fused": fused, "previous": previous}[verdict["kept"]], verdict

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.aggregator.aggregate_evaluate(server_round, replies)
