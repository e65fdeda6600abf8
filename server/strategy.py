"""FedAvg plus server-side distillation, and partitions handed out by the server."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.distillation import ServerDistillation
from server.sampling import sample, wait_for_nodes
from server.validation import clip_update, screen_replies


class DistillFedAvg(FedAvg):
    """FedAvg (weights n_i/n via ``num-examples``) that distils after each aggregation.

    Sampling waits at most ``node_wait_timeout`` seconds for ``min_available_nodes``
    and draws from one snapshot of the connected nodes (``server/sampling.py``);
    every instruction carries a TTL of ``round_timeout`` so a slow node does not
    work through stale rounds. Each node is told which partition of the clients'
    pool is its own: nodes sorted by ID get 0..n-1, so clients started without a
    ``partition-id`` in their node config (docker-compose replicas) still train on
    distinct data. Per-round timings and client metrics land in ``round_stats``.
    """

    def __init__(self, distillation: ServerDistillation | None, num_partitions: int = 0,
                 node_wait_timeout: float = 300.0, round_timeout: float | None = None,
                 max_update_norm: float = 0.0, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        self.distillation = distillation
        self.num_partitions = num_partitions  # 0: one partition per node connected at round 1
        self.node_wait_timeout = node_wait_timeout
        self.round_timeout = round_timeout
        self.max_update_norm = max_update_norm  # 0: updates are not clipped
        self.partition_of: dict[int, int] = {}
        self.round_stats: dict[int, dict] = {}
        self.global_arrays: ArrayRecord | None = None  # what this round sent: replies are checked against it
        self._round_started = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        self.global_arrays = arrays
        if self.fraction_train == 0.0:
            return []
        return self._instructions(server_round, arrays, config, grid, MessageType.TRAIN,
                                  self.fraction_train, self.min_train_nodes)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        return self._instructions(server_round, arrays, config, grid, MessageType.EVALUATE,
                                  self.fraction_evaluate, self.min_evaluate_nodes)

    def _instructions(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                      message_type: str, fraction: float, minimum: int) -> list[Message]:
        """One message per sampled node: the model, the config with the node's partition, a TTL."""
        connected = wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)
        chosen = sample(connected, fraction, minimum)
        log(INFO, "%s: sampled %d nodes (out of %d)", message_type, len(chosen), len(connected))
        if not self.partition_of:
            self.partition_of = {node: i for i, node in enumerate(connected)}
            self.num_partitions = self.num_partitions or len(connected)
        messages = []
        for node in chosen:
            # A node that joins later shares a partition rather than getting none.
            partition = self.partition_of.setdefault(node, len(self.partition_of)) % self.num_partitions
            node_config = ConfigRecord({**dict(config), "server-round": server_round,
                                        "partition-id": partition, "num-partitions": self.num_partitions})
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: node_config})
            messages.append(Message(content=content, dst_node_id=node, message_type=message_type, ttl=self.round_timeout))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop bad updates, clip the rest, average them, then distil (and maybe fine-tune) on the proxy set.

        Each reply is checked against the global model this round sent
        (``server/validation.py``); a rejected one is logged with its node and
        reason. With ``max_update_norm`` > 0 each update (client model − global
        model) is scaled to at most that L2 norm. With no valid reply FedAvg
        returns no arrays: the previous global model stays and distillation is
        skipped.
        """
        replies = list(replies)
        if self.global_arrays is None:
            raise RuntimeError("aggregate_train before configure_train: no global model to check replies against")
        valid, errors, rejected = screen_replies(replies, self.global_arrays, self.weighted_by_key)
        for rejection in rejected:
            log(WARNING, "fl-distill: round %d: dropped the update of node %d: %s",
                server_round, rejection.node_id, rejection.reason)
        clipped = []
        if self.max_update_norm > 0:
            for reply in valid:
                if (norm := clip_update(reply, self.global_arrays, self.max_update_norm)) > self.max_update_norm:
                    clipped.append({"node-id": reply.metadata.src_node_id, "norm": norm})
        arrays, metrics = super().aggregate_train(server_round, valid + errors)
        stats: dict = {
            "train-seconds": time.perf_counter() - self._round_started,
            "heard-from": sorted(r.metadata.src_node_id for r in replies if not r.has_error()),
            "failures": len(errors),
            "rejected": [r.to_dict() for r in rejected],
            "clipped": clipped,
            "client-metrics": dict(metrics) if metrics is not None else {},
            "clients": [
                {"node-id": r.metadata.src_node_id, **dict(next(iter(r.content.metric_records.values())))}
                for r in valid
            ],
        }
        if arrays is not None and self.distillation is not None:
            client_arrays = [r.content[self.arrayrecord_key] for r in valid]
            arrays, stats["distill"] = self.distillation.run(arrays, client_arrays)
        self.round_stats[server_round] = stats
        return arrays, metrics
