"""Model families on the server: each family's clients are aggregated among themselves, by their own strategy.

FedDF's heterogeneous setting (Lin et al. 2020, Sec. 4.3; the authors' ``Master._avg_over_archs``,
``../shared/notes/heterogeneous-fusion.md``): a model can only be averaged with models of its own
architecture, so each family (``common/models.py`` ``MODEL_FAMILIES``) has its own global model and its
own instance of the Flower strategy ``aggregation`` names, with its own server state (FedAvgM's momentum,
FedAdam's moments). Knowledge crosses families only through distillation (``server/distillation.py``).

:class:`ModelFamilies` is itself a Flower ``Strategy`` and sits where the one aggregation strategy sat
(``server/strategy.py``): Flower's loop hands it one record with every family's model
(``common/model_families.pack``); it sends each node its own family's model (config ``model-family``),
checks each reply against that family's model, and aggregates each family's replies alone. A family with
no valid reply in a round keeps its model. With one family it is that family's strategy, record for record.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.model_families import family_of, pack, unpack
from server.sampling import SampledGrid
from server.validation import Rejection, screen_replies, update_problem


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of a model's serialised arrays (what one message carries, framing aside)."""
    return sum(len(array.data) for array in record.values())


class ModelFamilies(Strategy):
    """One Flower strategy per model family, behind the one-strategy interface Flower's loop drives.

    Args:
        strategies: {family: its aggregation strategy}, the global model's family first (``model-families``).
        small_partitions: partitions that train ``small`` when their node declares no ``model``.

    ``family_of`` maps node IDs to families (:meth:`assign`); a node not assigned trains the first family.
    After :meth:`configure_train`, ``sent`` holds {family: the model this round sent} and ``bytes_sent``
    {family: bytes of models sent}; after :meth:`aggregate_train`, ``aggregated`` lists the families that
    had a valid reply.
    """

    def __init__(self, strategies: dict[str, Strategy], small_partitions: frozenset[int] = frozenset()):
        super().__init__()
        if not strategies:
            raise ValueError("ModelFamilies needs at least one family's strategy")
        self.strategies = dict(strategies)
        self.families = tuple(strategies)
        self.small_partitions = small_partitions
        self.family_of: dict[int, str] = {}
        self.sent: dict[str, ArrayRecord] = {}
        self.bytes_sent: dict[str, int] = {}
        self.aggregated: list[str] = []

    @property
    def first(self) -> Strategy:
        """The global model's family's strategy (its keys and weights are every family's)."""
        return self.strategies[self.families[0]]

    @property
    def arrayrecord_key(self) -> str:
        return self.first.arrayrecord_key

    @property
    def weighted_by_key(self) -> str:
        return self.first.weighted_by_key

    def assign(self, node: int, declared: str | None, partition: int | None) -> str:
        """Record the family ``node`` trains (``common/model_families.family_of``) and return it.

        A family this run does not federate is returned but not recorded: the caller leaves the node out.
        """
        family = family_of(declared, partition, self.families, self.small_partitions)
        if family in self.strategies:
            self.family_of[node] = family
        return family

    def family(self, node: int) -> str:
        return self.family_of.get(node, self.families[0])

    def by_family(self, replies: Iterable[Message]) -> dict[str, list[Message]]:
        """Replies grouped by their sender's family, in ``families``' order (empty groups left out)."""
        groups: dict[str, list[Message]] = {family: [] for family in self.families}
        for reply in replies:
            groups[self.family(reply.metadata.src_node_id)].append(reply)
        return {family: group for family, group in groups.items() if group}

    def summary(self) -> None:
        for family, strategy in self.strategies.items():
            if len(self.families) > 1:
                log(INFO, "\t├── model family %r:", family)
            strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._configure("configure_train", server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._configure("configure_evaluate", server_round, arrays, config, grid)

    def _configure(self, method: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                   grid: Grid) -> list[Message]:
        """Each family's strategy addresses that family's nodes among ``grid``'s with that family's model."""
        self.sent = unpack(arrays, self.families)
        nodes = grid.get_node_ids()
        messages = []
        for family, strategy in self.strategies.items():
            members = [node for node in nodes if self.family(node) == family]
            if not members:  # Flower's strategies wait with no deadline for at least one node
                self.bytes_sent[family] = 0
                continue
            ours = list(getattr(strategy, method)(server_round, self.sent[family], config, SampledGrid(grid, members)))
            for message in ours:  # Flower's strategies share one ConfigRecord between messages: replace, not edit
                for key, record in list(message.content.config_records.items()):
                    message.content[key] = ConfigRecord({**dict(record), "model-family": family})
            self.bytes_sent[family] = record_bytes(self.sent[family]) * len(ours)
            messages += ours
        return messages

    def screen(self, replies: Iterable[Message]) -> tuple[list[Message], list[Message], list[Rejection]]:
        """:func:`server.validation.screen_replies` per family, against the model that family was sent.

        A reply whose arrays are another family's model is rejected with a reason that says so.
        """
        valid, errors, rejected = [], [], []
        for family, group in self.by_family(replies).items():
            ok, failed, bad = screen_replies(group, self.sent[family], self.weighted_by_key)
            valid += ok
            errors += failed
            for rejection in bad:
                reply = next(r for r in group if r.metadata.src_node_id == rejection.node_id)
                other = next((f for f in self.families if f != family and update_problem(
                    reply, self.sent[f], self.weighted_by_key) is None), None)
                rejected.append(rejection if other is None else Rejection(
                    rejection.node_id, f"its arrays are the {other!r} family's model, but this node trains {family!r}"))
        return valid, errors, rejected

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each family's replies aggregated by its strategy; a family without a valid one keeps its model.

        Returns every family's model packed (None when no family aggregated anything) and the train metrics,
        the families' aggregated metrics weighted by their examples when there are several.
        """
        models, per_family = dict(self.sent), {}
        self.aggregated = []
        for family, group in self.by_family(replies).items():
            arrays, metrics = self.strategies[family].aggregate_train(server_round, group)
            if arrays is not None:
                models[family] = arrays
                self.aggregated.append(family)
            if metrics is not None:
                examples = sum(int(next(iter(r.content.metric_records.values())).get(self.weighted_by_key, 0))
                               for r in group if not r.has_error() and r.content.metric_records)
                per_family[family] = (metrics, examples)
        return (pack(models) if self.aggregated else None), _weighted(per_family)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.first.aggregate_evaluate(server_round, replies)


def _weighted(per_family: dict[str, tuple[MetricRecord, int]]) -> MetricRecord | None:
    """One family's metrics as they are; several families' numeric metrics weighted by their examples."""
    if len(per_family) <= 1:
        return next(iter(per_family.values()))[0] if per_family else None
    total = sum(examples for _, examples in per_family.values()) or 1
    keys = set.intersection(*(set(metrics) for metrics, _ in per_family.values()))
    return MetricRecord({key: sum(float(metrics[key]) * examples for metrics, examples in per_family.values()) / total
                         for key in sorted(keys)
                         if all(isinstance(m[key], (int, float)) for m, _ in per_family.values())})


def family_roster(families: ModelFamilies, partition_of: dict[int, int], nodes: list[int],
                  num_partitions: int) -> tuple[str, list[str]]:
    """Which of ``nodes`` train which family ('large: 3 node(s), partitions 0-2; ...'), and a warning per
    family that none of them trains: its model would stay at its initial weights, yet be reported and
    exported. ``partition_of``: node -> partition (taken modulo ``num_partitions``)."""
    members: dict[str, list[int]] = {family: [] for family in families.families}
    for node in nodes:
        members.setdefault(families.family(node), []).append(partition_of[node] % num_partitions)
    line = "; ".join(f"{family}: {len(parts)} node(s), partitions {_ranges(sorted(set(parts)))}"
                     for family, parts in members.items() if family in families.strategies)
    warnings = []
    for rank, family in enumerate(families.families):
        if members[family]:
            continue
        rule = (f"no node declares model = {family!r} and small-partitions names none of partitions 0-{num_partitions - 1}"
                if family == "small" else
                f"no node declares model = {family!r}, and every partition is in small-partitions" if rank == 0 else
                f"no node declares model = {family!r}; nodes without one train the first family, "
                f"{families.families[0]!r}")
        role = "the global model (the teacher" + (", which the student learns from)" if rank == 0 else ")")
        warnings.append(f"model family {family!r} has none of the {len(nodes)} node(s): {rule}; its model"
                        f"{' (' + role + ')' if rank == 0 else ''} stays at its initial weights, and is still "
                        "reported and exported")
    return line, warnings


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in spans) or "none"


def family_stats(families: ModelFamilies, replies: list[Message], valid: list[Message]) -> dict:
    """Per model family this round: nodes sent to / heard from / valid, bytes of models sent and received."""
    stats = {}
    for family in families.families:
        heard = [r for r in replies if not r.has_error() and families.family(r.metadata.src_node_id) == family]
        stats[family] = {
            "heard-from": sorted(r.metadata.src_node_id for r in heard),
            "valid": sum(families.family(r.metadata.src_node_id) == family for r in valid),
            "aggregated": family in families.aggregated,
            "bytes-sent": families.bytes_sent.get(family, 0),
            "bytes-received": sum(record_bytes(record) for r in heard for record in r.content.array_records.values()),
        }
    return stats
