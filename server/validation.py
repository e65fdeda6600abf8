"""Client replies checked before the server uses them: train updates against the global model, fusion-check scores.

The first layer a round's replies go through (``../shared/notes/strategy-layers.md``):
Flower's FedAvg checks only that replies agree on array *names*, and a reply that
disagrees fails the whole run (``InconsistentMessageReplies``); it averages NaN,
Inf, huge values, broadcastable wrong shapes and negative weights in silently, and
divides by zero when every weight is 0. Here each reply is compared with the
global model the round sent out; a bad one is dropped with its reason, so no later
layer (aggregation, distillation) ever sees it.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message


@dataclass(frozen=True)
class Rejection:
    """A reply dropped before aggregation: who sent it and why."""

    node_id: int
    reason: str

    def to_dict(self) -> dict:
        return {"node-id": self.node_id, "reason": self.reason}


def update_problem(reply: Message, reference: ArrayRecord, weight_key: str = "num-examples") -> str | None:
    """Why ``reply`` (a train reply without error) cannot be aggregated, or None if it can.

    Checks, against ``reference`` (the global model this round sent): exactly one
    ArrayRecord with the same array names, shapes and dtypes, every value finite;
    exactly one MetricRecord whose ``weight_key`` is a whole number > 0.
    """
    arrays = list(reply.content.array_records.values())
    metrics = list(reply.content.metric_records.values())
    if len(arrays) != 1 or len(metrics) != 1:
        return f"expected one ArrayRecord and one MetricRecord, got {len(arrays)} and {len(metrics)}"
    update, record = arrays[0], metrics[0]
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        return f"array names differ from the global model: missing {missing}, unexpected {extra}"
    for name, expected in reference.items():
        got = update[name]
        if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
            return (f"array {name!r} is {got.dtype}{list(got.shape)}, "
                    f"the global model's is {expected.dtype}{list(expected.shape)}")
        values = got.numpy()
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            return f"array {name!r} has {int((~np.isfinite(values)).sum())} non-finite values (NaN or Inf)"
    if _whole_positive(weight := record.get(weight_key)) is None:
        return f"{weight_key!r} = {weight!r} is not allowed; it must be a whole number > 0"
    return None


def _whole_positive(value) -> int | None:
    """``value`` as an int when it is a whole number > 0 (an int, or a float such as 12.0), else None."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def score_problem(record, name: str) -> str | None:
    """Why ``record``'s ``<name>-accuracy`` / ``<name>-loss`` cannot count, or None if they can.

    The accuracy must be a number in [0, 1]; the loss a number >= 0, infinity allowed (the cross-entropy
    of a model that diverged), NaN not.
    """
    accuracy, loss = record.get(f"{name}-accuracy"), record.get(f"{name}-loss")
    if not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool) or not 0.0 <= accuracy <= 1.0:
        return f"'{name}-accuracy' = {accuracy!r} is not allowed; it must be a number in [0, 1]"
    if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not loss >= 0:
        return f"'{name}-loss' = {loss!r} is not allowed; it must be a number >= 0"
    return None


def evaluation_problem(reply: Message, candidates: Iterable[str]) -> str | None:
    """Why an evaluate reply (without error) to the fusion check cannot count, or None if it can.

    Checks: exactly one MetricRecord, ``num-examples`` a whole number > 0, and for
    every name in ``candidates`` a valid ``<name>-accuracy`` and ``<name>-loss``
    (:func:`score_problem`; ``client/client_app.py`` ``evaluate_local``).
    """
    metrics = list(reply.content.metric_records.values())
    if len(metrics) != 1:
        return f"expected one MetricRecord, got {len(metrics)}"
    return scores_problem(metrics[0], candidates)


def scores_problem(record, candidates: Iterable[str]) -> str | None:
    """Why a node's fusion-check scores (one reply's MetricRecord, or its replies' merged) cannot count, or None.

    Checks: ``num-examples`` a whole number > 0, and for every name in ``candidates`` a valid
    ``<name>-accuracy`` and ``<name>-loss`` (:func:`score_problem`).
    """
    if _whole_positive(record.get("num-examples")) is None:
        return f"'num-examples' = {record.get('num-examples')!r} is not allowed; it must be a whole number > 0"
    for name in candidates:
        if problem := score_problem(record, name):
            return problem
    return None


def screen_replies(
    replies: Iterable[Message], reference: ArrayRecord, weight_key: str = "num-examples"
) -> tuple[list[Message], list[Message], list[Rejection]]:
    """Split a round's replies into (valid, error replies, rejections).

    Error replies (a failed or unreachable node) are Flower's own and pass
    through unchanged for FedAvg to count. Valid replies also agree with the most
    common set of metric names (FedAvg would otherwise fail the run).
    """
    valid, errors, rejected = [], [], []
    for reply in replies:
        if reply.has_error():
            errors.append(reply)
        elif problem := update_problem(reply, reference, weight_key):
            rejected.append(Rejection(reply.metadata.src_node_id, problem))
        else:
            valid.append(reply)
    metric_names = [tuple(sorted(next(iter(r.content.metric_records.values())))) for r in valid]
    if metric_names:
        usual = Counter(metric_names).most_common(1)[0][0]
        for reply, names in zip(list(valid), metric_names):
            if names != usual:
                valid.remove(reply)
                rejected.append(Rejection(reply.metadata.src_node_id,
                                          f"metric names {list(names)} differ from the other replies' {list(usual)}"))
    return valid, errors, rejected


OWN_DATA = -1  # a train reply's ``partition-id`` when the client trained on its own ``data-dir``


@dataclass
class ExampleCounts:
    """The check of each reply's ``num-examples``: FedAvg weights by it, so one false claim would decide the model.

    Args:
        partition_sizes: ``k`` -> the number of examples in each of the pool's ``k`` partitions, computed as the
            clients compute them (``common.data.partition_sizes``); raises ValueError for a ``k`` the pool
            cannot be cut into.
        max_ratio: a claim the server cannot check against this run's partitioning (own ``data-dir``, or a
            node that pins another ``num-partitions``) weighs at most ``max_ratio`` × the lower median of the
            round's claims; 0 = no cap (``max-examples-ratio``).
    """

    partition_sizes: Callable[[int], Sequence[int]]
    max_ratio: float = 4.0

    def check(self, replies: list[Message], num_partitions: int, weight_key: str = "num-examples"
              ) -> tuple[list[Message], list[Rejection], list[dict]]:
        """Split screened train replies into (valid, rejections, capped).

        Each reply names the data it trained on: ``partition-id`` of ``num-partitions`` in its metrics (taken
        out here, so that no aggregation averages them; ``partition-id`` -1 or absent: its own data). On a
        partition its ``weight_key`` must equal that partition's size, or the reply is rejected with both
        numbers. A claim not cut by this run's ``num_partitions`` partitions and above the cap is lowered to
        the cap in place; ``capped`` lists ``{node-id, claimed, counted}``.
        """
        valid, rejected, unchecked = [], [], set()
        for reply in replies:
            record = next(iter(reply.content.metric_records.values()))
            node, claimed = reply.metadata.src_node_id, int(record[weight_key])
            partition = int(record.pop("partition-id", OWN_DATA))
            partitions = int(record.pop("num-partitions", 0))
            if partition != OWN_DATA and (problem := self._count_problem(claimed, partition, partitions, weight_key)):
                rejected.append(Rejection(node, problem))
                continue
            if partition == OWN_DATA or partitions != num_partitions:
                unchecked.add(node)
            valid.append(reply)
        capped = []
        if self.max_ratio and valid:
            claims = [int(next(iter(r.content.metric_records.values()))[weight_key]) for r in valid]
            cap = max(1, int(self.max_ratio * statistics.median_low(claims)))
            for reply, claimed in zip(valid, claims):
                if reply.metadata.src_node_id in unchecked and claimed > cap:
                    next(iter(reply.content.metric_records.values()))[weight_key] = cap
                    capped.append({"node-id": reply.metadata.src_node_id, "claimed": claimed, "counted": cap})
        return valid, rejected, capped

    def _count_problem(self, claimed: int, partition: int, partitions: int, weight_key: str) -> str | None:
        try:
            sizes = self.partition_sizes(partitions)
        except ValueError as err:
            return f"it names num-partitions = {partitions}, which the pool cannot be cut into ({err})"
        if not 0 <= partition < len(sizes):
            return f"it trained partition-id = {partition}, but the pool has {len(sizes)} partitions (0..{len(sizes) - 1})"
        if claimed != sizes[partition]:
            return f"{weight_key!r} = {claimed}, but partition {partition} of {len(sizes)} holds {sizes[partition]} examples"
        return None


def clip_update(reply: Message, reference: ArrayRecord, max_norm: float) -> float:
    """Scale ``reply``'s update (its model minus ``reference``) to an L2 norm of at most ``max_norm``.

    The norm is taken over all floating-point tensors together (as in DP-FedAvg,
    McMahan et al. 2018); integer tensors (counters) are left alone. Changes the
    reply's ArrayRecord in place; returns the update's norm before clipping.
    """
    update = next(iter(reply.content.array_records.values()))
    bases = {name: array.numpy() for name, array in reference.items()}
    deltas = {name: update[name].numpy().astype(np.float64) - base
              for name, base in bases.items() if np.issubdtype(base.dtype, np.floating)}
    norm = float(np.sqrt(sum(float((d * d).sum()) for d in deltas.values())))
    if norm > max_norm:
        for name, delta in deltas.items():
            update[name] = Array((bases[name] + delta * (max_norm / norm)).astype(bases[name].dtype))
    return norm
