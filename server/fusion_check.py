"""The fusion check: the clients, who hold labels, say whether FedDF's fused model beats the averaged one.

FedDF fuses the round's client ensemble into the averaged model on a proxy set the
server holds without labels (``server/distillation.py``). Its label-free guard
measures agreement with that very teacher, so it cannot tell a teacher worse than
the averaged model from a better one. With ``fusion-check = "clients"`` the server
asks a sample of the nodes (``fusion-check-fraction`` of the checking nodes, at
least ``min-nodes``) to evaluate the candidates on their own labelled data: Flower
``evaluate`` messages carrying the models as the ArrayRecords ``averaged`` and
``fused``, before the next round's train. The averaged model goes out as soon as the
round has aggregated, so the nodes score it while the server distils; the fused one,
when the Distiller kept a fused step, once it exists. A node answers each with its
example count and each candidate's loss and accuracy there (``client/client_app.py``
``evaluate_local``): no label, example or model leaves it.

The checking nodes (``fusion-check-nodes``) are, with ``idle`` (the default), the
connected nodes not sampled to train this round: out of sample, since no candidate was
built from their data this round; when fewer than ``min-nodes`` are idle, and always
with ``trained``, this round's clients, which scored the model the round started from
(``previous``) in their train replies on the same data, so it is a third candidate
at no cost (in-sample scores, which favour the new candidates). Of the averaged and the fused model the one with the higher
example-weighted accuracy, Σ n_i·acc_i / Σ n_i over the valid replies, is kept (a
tie keeps the averaged model, FedAvg's own choice), unless the starting model
scores more than ``fusion-check-margin`` above it: then a round that made the model
clearly worse on the clients' data does not go on. A node whose reply is an error,
comes too late, is missing for one of its messages, or fails
:func:`server.validation.evaluation_problem` does not count. With no valid reply the
proxy criterion decides (the Distiller's choice) and a WARNING says so.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from server.reply_poll import pull_replies
from server.sampling import sample
from server.validation import Rejection, evaluation_problem, score_problem, scores_problem

CANDIDATES = ("averaged", "fused")  # the ArrayRecords in the check's message
PREVIOUS = "previous"  # the model this round started from: scored in the train replies (``eval-accuracy``)


def choose(replies: Iterable[Message], proxy_choice: str, candidates: tuple[str, ...] = CANDIDATES,
           received: dict[int, dict] | None = None, margin: float = 0.0, max_ratio: float = 0.0) -> dict:
    """The verdict on the replies to one check: which candidate is kept, and on what.

    ``replies``: the evaluate replies; a node's replies to several messages (the averaged model's, the
    fused one's) are merged, and none of them counts when one is an error, fails the reply check, or
    names another ``num-examples`` than the others. ``received``: {node ID: that node's train reply metrics this round}, whose ``eval-accuracy`` and
    ``eval-loss`` score the model the round started from on the same data (``client/client_app.py`` ``train``);
    with it, ``previous`` is a candidate too when every counted node has a valid score for it
    (:func:`server.validation.score_problem`; an invalid one is no score), and a reply whose
    ``num-examples`` differs from that of a train reply with a valid score does not count.

    Returns ``kept`` (a candidate's name), ``by`` ('clients', or 'proxy' when no reply counted and
    ``proxy_choice`` decided), ``answered`` (nodes whose replies count), ``examples`` (their Σ n_i), ``accuracy`` and
    ``loss`` ({candidate: example-weighted mean Σ n_i·x_i / Σ n_i}, empty without a valid reply; a loss is
    None when a node's was infinite), ``failed``
    (node IDs whose reply was an error) and ``rejected`` ([{node-id, reason}]). Among ``candidates`` ties
    go to the earlier one (the averaged model first, FedAvg's own choice). ``max_ratio``
    (``max-examples-ratio``; 0 = none): a node with no train reply in ``received`` (an idle one) has no
    checked count, so it weighs at most that many times the lower median of ``received``'s ``num-examples``
    (:class:`server.validation.ExampleCounts` caps unchecked train claims alike). ``previous`` is kept only when
    its accuracy exceeds the best of them by more than ``margin``: a retrained round that scores a little
    lower is noise to train on from, not a reason to stay (greedy rollbacks stall a run:
    ``docs/distillation.md``).
    """
    received = received or {}
    valid, failed, rejected = [], [], []
    claims = [int(m["num-examples"]) for m in received.values()]  # valid train replies: checked counts
    cap = max(1, int(max_ratio * statistics.median_low(claims))) if max_ratio and claims else 0
    by_node: dict[int, list[Message]] = {}
    for reply in replies:  # a node may answer two messages: the averaged model's and the fused one's
        by_node.setdefault(reply.metadata.src_node_id, []).append(reply)
    for node, answers in by_node.items():
        if any(reply.has_error() for reply in answers):
            failed.append(node)
            continue
        problem = next((p for reply in answers if (p := evaluation_problem(reply, ())) is not None), None)
        record: dict = {}
        if problem is None:
            records = [dict(next(iter(reply.content.metric_records.values()))) for reply in answers]
            counts = [r["num-examples"] for r in records]
            for r in records:
                record.update(r)
            problem = (f"'num-examples' differs between its replies ({', '.join(map(str, sorted(counts)))})"
                       if len(set(counts)) > 1 else scores_problem(record, candidates))
        trained = received.get(node)
        if problem is None and trained is not None and score_problem(trained, "eval") is None:
            if int(trained.get("num-examples", -1)) != int(record["num-examples"]):
                problem = (f"'num-examples' = {record['num-examples']} differs from the {trained.get('num-examples')} "
                           "of its train reply this round")
            record.update({f"{PREVIOUS}-accuracy": float(trained["eval-accuracy"]),
                           f"{PREVIOUS}-loss": float(trained["eval-loss"])})
        if problem:
            rejected.append(Rejection(node, problem).to_dict())
            continue
        if trained is None and cap:  # no train reply this round (an idle node): its count is unchecked
            record["num-examples"] = min(int(record["num-examples"]), cap)
        valid.append(record)
    verdict: dict = {"answered": len(valid), "failed": sorted(failed), "rejected": rejected,
                     "accuracy": {}, "loss": {}, "examples": 0}
    if not valid:
        return {**verdict, "kept": proxy_choice, "by": "proxy"}
    scored = (*candidates, PREVIOUS) if all(f"{PREVIOUS}-accuracy" in r for r in valid) else candidates
    examples = sum(int(record["num-examples"]) for record in valid)
    for name in scored:
        for metric in ("accuracy", "loss"):
            verdict[metric][name] = sum(int(r["num-examples"]) * float(r[f"{name}-{metric}"])
                                        for r in valid) / examples
        if not math.isfinite(verdict["loss"][name]):
            verdict["loss"][name] = None  # a diverged model on some node: JSON has no infinity
    # Σ n_i·acc_i are counts of correct predictions: compare them, not their ratios' last bits.
    correct = {name: round(verdict["accuracy"][name] * examples, 6) for name in scored}
    kept = max(candidates, key=lambda name: (correct[name], -candidates.index(name)))
    if PREVIOUS in correct and correct[PREVIOUS] > correct[kept] + round(margin * examples, 6):
        kept = PREVIOUS
    return {**verdict, "examples": examples, "kept": kept, "by": "clients"}


@dataclass
class Asked:
    """The evaluate messages of one :meth:`FusionCheck.ask`: which candidates, to which nodes, under which IDs."""

    candidates: tuple[str, ...]
    placements: dict[int, tuple[int, int]]  # node asked -> (partition, num-partitions) its message named, in order
    ids: dict[str, int]  # message ID -> node ID
    bytes_sent: int  # the candidates' serialised array bytes, in all its messages


class FusionCheck:
    """Asks a sample of the nodes to score the fusion's candidates on their data; keeps the best.

    The candidates are the averaged and the fused model (just the averaged one when the Distiller kept
    it), scored in ``evaluate`` messages, and, when this round's clients check, the model this round started
    from, which they already scored before training (their train replies' ``eval-accuracy``): a round whose averaged and
    fused models both came out worse on the clients' data than the model it started from by more than
    ``margin`` keeps that model, so the next round trains from it again (other shuffles, other updates).

    The strategy asks in two steps (``server/strategy.py``): the averaged model as soon as the round has
    aggregated (:meth:`ask`), so the nodes score it while the server distils, and the fused model once it
    exists; :meth:`collect` then waits for both and decides. A round whose Distiller kept the averaged
    model waits on nothing more after the fusion than the first step's replies. :meth:`run` does both
    steps at once, one message per node.

    Args:
        fraction: ``fusion-check-fraction``, the share of the checking nodes asked (at least ``min_nodes``,
            at most all of them).
        min_nodes: ``min-nodes``.
        margin: ``fusion-check-margin``: how much better (accuracy in [0, 1]) the starting model must score
            than both new candidates to be kept (:func:`choose`).
        timeout: seconds :meth:`collect` waits for the replies (``round-timeout``; also the messages' TTL).
        seed: the run's seed; each round's sample is drawn from a generator seeded by (seed, round), so the
            check never shifts the training sample's generator and a seed repeats which nodes check.
        poll_interval: seconds between two pulls of the replies.
        nodes: ``fusion-check-nodes``: ``'idle'``, the nodes not sampled to train this round when there are
            at least ``min_nodes`` (``from_idle``; the strategy picks them), else this round's clients;
            ``'trained'``, always this round's clients.
        max_ratio: ``max-examples-ratio``, the cap on a reply's weight (:func:`choose`).
    """

    def __init__(self, fraction: float, min_nodes: int, timeout: float, seed: int, margin: float = 0.0,
                 poll_interval: float = 0.1, nodes: str = "idle", max_ratio: float = 0.0):
        self.fraction, self.min_nodes, self.timeout, self.seed = fraction, min_nodes, timeout, seed
        self.max_ratio = max_ratio
        self.from_idle = nodes == "idle"
        self.margin, self.poll_interval = margin, poll_interval

    def nodes(self, placements: dict[int, tuple[int, int]], server_round: int) -> list[int]:
        """The nodes asked in ``server_round``, in partition order: ``placements`` ({node ID: (partition,
        num-partitions)} of the checking nodes) sampled with the (seed, round) generator."""
        ordered = sorted(placements, key=lambda node: (placements[node][0], node))
        rng = random.Random(f"fusion-check/{self.seed}/{server_round}")
        return sorted(sample(ordered, self.fraction, self.min_nodes, rng), key=ordered.index)

    def ask(self, grid: Grid, nodes: list[int], placements: dict[int, tuple[int, int]], server_round: int,
            candidates: dict[str, ArrayRecord], family: str = "large") -> Asked:
        """Push one ``evaluate`` message carrying ``candidates`` ({name: model}) to each of ``nodes``; returns
        at once. ``family``: the candidates' model family (``model-family`` in the messages' config)."""
        messages = []
        for node in nodes:
            partition, partitions = placements[node]
            content = RecordDict({**candidates, "config": ConfigRecord(
                {"server-round": server_round, "partition-id": partition, "num-partitions": partitions,
                 "model-family": family})})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE, ttl=self.timeout))
        ids = list(grid.push_messages(messages)) if messages else []
        model_bytes = sum(len(array.data) for record in candidates.values() for array in record.values())
        return Asked(tuple(candidates), {node: placements[node] for node in nodes},
                     {mid: node for mid, node in zip(ids, nodes) if mid}, model_bytes * len(nodes))

    def collect(self, grid: Grid, asked: list[Asked], server_round: int, proxy_choice: str,
                received: dict[int, dict] | None = None, family: str = "large", named: bool = False,
                started: float | None = None) -> dict:
        """Wait for the replies to ``asked`` (until all are in, or for ``timeout`` s) and decide; returns
        :func:`choose`'s verdict plus ``asked`` (nodes), ``seconds`` (since ``started``, a ``time.perf_counter()``, default now: what the
        check adds to the round once the fused model exists) and ``bytes-sent``.

        A node counts only with a reply to every ask it was in: one that answered only some is silent.
        ``received``: as in :func:`choose`; ``named``: name ``family`` in the log line (a run of several).
        """
        started = time.perf_counter() if started is None else started
        replies = pull_replies(grid, [mid for one in asked for mid in one.ids], self.timeout, self.poll_interval)
        expected = Counter(node for one in asked for node in one.placements)  # messages each node owes
        answered = Counter(reply.metadata.src_node_id for reply in replies)
        complete = [r for r in replies if r.has_error() or answered[r.metadata.src_node_id] == expected[r.metadata.src_node_id]]
        candidates = tuple(name for one in asked for name in one.candidates)
        verdict = choose(complete, proxy_choice, candidates, received, self.margin, self.max_ratio)
        nodes = sorted(expected)
        verdict.update(asked=len(nodes), seconds=time.perf_counter() - started,
                       **{"bytes-sent": sum(one.bytes_sent for one in asked)})
        silent = len(nodes) - verdict["answered"] - len(verdict["failed"]) - len(verdict["rejected"])
        if verdict["by"] == "proxy":
            log(WARNING, "fl-distill: round %d: fusion check: no valid reply from the %d node(s) asked (%d failed, %d "
                "rejected, %d silent); the proxy criterion keeps the %s model", server_round, len(nodes),
                len(verdict["failed"]), len(verdict["rejected"]), silent, proxy_choice)
        else:
            log(INFO, "fl-distill: round %d: fusion check%s: %s kept (clients' accuracy %s), %d of %d node(s), %d "
                "examples", server_round, f" of family {family!r}" if named else "", verdict["kept"],
                ", ".join(f"{name} {acc:.4f}" for name, acc in verdict["accuracy"].items()),
                verdict["answered"], len(nodes), verdict["examples"])
        for rejection in verdict["rejected"]:
            log(WARNING, "fl-distill: round %d: fusion check: the reply of node %d does not count: %s",
                server_round, rejection["node-id"], rejection["reason"])
        return verdict

    def run(self, grid: Grid, placements: dict[int, tuple[int, int]], server_round: int,
            candidates: dict[str, ArrayRecord], proxy_choice: str, received: dict[int, dict] | None = None,
            family: str = "large", named: bool = False) -> dict:
        """One check in one step: every candidate in one message per sampled node (:meth:`ask`), then
        :meth:`collect`."""
        started = time.perf_counter()
        asked = self.ask(grid, self.nodes(placements, server_round), placements, server_round, candidates, family)
        return self.collect(grid, [asked], server_round, proxy_choice, received, family, named, started)
