"""The fusion check: the clients, who hold labels, say whether FedDF's fused model beats the averaged one.

FedDF fuses the round's client ensemble into the averaged model on a proxy set the
server holds without labels (``server/distillation.py``). Its label-free guard
measures agreement with that very teacher, so it cannot tell a teacher worse than
the averaged model from a better one. With ``fusion-check = "clients"`` the server
asks a sample of the nodes (``fusion-check-fraction`` of those connected, at least
``min-nodes``) to evaluate both candidates on their own labelled data: one Flower
``evaluate`` message per node, carrying the two models as the ArrayRecords
``averaged`` and ``fused``, before the next round's train. A node answers with its
example count and each candidate's loss and accuracy there (``client/client_app.py``
``evaluate_local``): no label, example or model leaves it.

The nodes asked are this round's clients, which scored the model the round started
from (``previous``) in their train replies on the same data, so it is a third
candidate at no cost. Of the averaged and the fused model the one with the higher
example-weighted accuracy, Σ n_i·acc_i / Σ n_i over the valid replies, is kept (a
tie keeps the averaged model, FedAvg's own choice), unless the starting model
scores more than ``fusion-check-margin`` above it: then a round that made the model
clearly worse on the clients' data does not go on. A reply that is an error, comes
too late, or fails :func:`server.validation.evaluation_problem` does not count.
With no valid reply the proxy criterion decides (the Distiller's choice) and a
WARNING says so.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from server.sampling import sample
from server.validation import Rejection, evaluation_problem, score_problem

CANDIDATES = ("averaged", "fused")  # the ArrayRecords in the check's message
PREVIOUS = "previous"  # the model this round started from: scored in the train replies (``eval-accuracy``)


def choose(replies: Iterable[Message], proxy_choice: str, candidates: tuple[str, ...] = CANDIDATES,
           received: dict[int, dict] | None = None, margin: float = 0.0) -> dict:
    """The verdict on the replies to one check: which candidate is kept, and on what.

    ``received``: {node ID: that node's train reply metrics this round}, whose ``eval-accuracy`` and
    ``eval-loss`` score the model the round started from on the same data (``client/client_app.py`` ``train``);
    with it, ``previous`` is a candidate too when every counted node has a valid score for it
    (:func:`server.validation.score_problem`; an invalid one is no score), and a reply whose
    ``num-examples`` differs from that of a train reply with a valid score does not count.

    Returns ``kept`` (a candidate's name), ``by`` ('clients', or 'proxy' when no reply counted and
    ``proxy_choice`` decided), ``answered`` (valid replies), ``examples`` (their Σ n_i), ``accuracy`` and
    ``loss`` ({candidate: example-weighted mean Σ n_i·x_i / Σ n_i}, empty without a valid reply; a loss is
    None when a node's was infinite), ``failed``
    (node IDs whose reply was an error) and ``rejected`` ([{node-id, reason}]). Among ``candidates`` ties
    go to the earlier one (the averaged model first, FedAvg's own choice); ``previous`` is kept only when
    its accuracy exceeds the best of them by more than ``margin``: a retrained round that scores a little
    lower is noise to train on from, not a reason to stay (greedy rollbacks stall a run:
    ``docs/distillation.md``).
    """
    received = received or {}
    valid, failed, rejected = [], [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed.append(node)
            continue
        problem = evaluation_problem(reply, candidates)
        record = dict(next(iter(reply.content.metric_records.values()))) if problem is None else {}
        trained = received.get(node)
        if problem is None and trained is not None and score_problem(trained, "eval") is None:
            if int(trained.get("num-examples", -1)) != int(record["num-examples"]):
                problem = (f"'num-examples' = {record['num-examples']} differs from the {trained.get('num-examples')} "
                           "of its train reply this round")
            record.update({f"{PREVIOUS}-accuracy": float(trained["eval-accuracy"]),
                           f"{PREVIOUS}-loss": float(trained["eval-loss"])})
        if problem:
            rejected.append(Rejection(node, problem).to_dict())
        else:
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


class FusionCheck:
    """Asks a sample of this round's clients to score the fusion's candidates on their data; keeps the best.

    The candidates are the averaged and the fused model (just the averaged one when the Distiller kept
    it), scored in one ``evaluate`` message per node, and the model this round started from, which the
    same nodes already scored before training (their train replies' ``eval-accuracy``): a round whose
    averaged and fused models both came out worse on the clients' data than the model it started from
    by more than ``margin`` keeps that model, so the next round trains from it again (other shuffles,
    other updates).

    Args:
        fraction: ``fusion-check-fraction``, the share of this round's valid train replies whose nodes are
            asked (at least ``min_nodes``, at most all of them).
        min_nodes: ``min-nodes``.
        margin: ``fusion-check-margin``: how much better (accuracy in [0, 1]) the starting model must score
            than both new candidates to be kept (:func:`choose`).
        timeout: seconds to wait for the replies (``round-timeout``; also the messages' TTL).
        seed: the run's seed; each round's sample is drawn from a generator seeded by (seed, round), so the
            check never shifts the training sample's generator and a seed repeats which nodes check.
    """

    def __init__(self, fraction: float, min_nodes: int, timeout: float, seed: int, margin: float = 0.0):
        self.fraction, self.min_nodes, self.timeout, self.seed = fraction, min_nodes, timeout, seed
        self.margin = margin

    def run(self, grid: Grid, placements: dict[int, tuple[int, int]], server_round: int,
            candidates: dict[str, ArrayRecord], proxy_choice: str, received: dict[int, dict] | None = None,
            family: str = "large", named: bool = False) -> dict:
        """One check; returns :func:`choose`'s verdict plus ``asked``, ``seconds`` and ``bytes-sent``.

        ``placements``: {node ID: (partition, num-partitions)} of the nodes that may be asked (this round's
        clients), sampled in partition order. ``candidates``: {name: model} sent to each (the averaged model
        first). ``received``: as in :func:`choose`. ``bytes-sent`` counts the models' serialised array bytes
        in all messages; each reply is ``num-examples`` plus two numbers per candidate. ``family``: the
        candidates' model family (``model-family`` in the messages' config), the asked nodes' own;
        ``named``: name it in the log line (a run of several families).
        """
        started = time.perf_counter()
        ordered = sorted(placements, key=lambda node: (placements[node][0], node))
        rng = random.Random(f"fusion-check/{self.seed}/{server_round}")
        chosen = sorted(sample(ordered, self.fraction, self.min_nodes, rng), key=ordered.index)
        messages = []
        for node in chosen:
            partition, partitions = placements[node]
            content = RecordDict({**candidates, "config": ConfigRecord(
                {"server-round": server_round, "partition-id": partition, "num-partitions": partitions,
                 "model-family": family})})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE, ttl=self.timeout))
        replies = list(grid.send_and_receive(messages, timeout=self.timeout)) if messages else []
        verdict = choose(replies, proxy_choice, tuple(candidates), received, self.margin)
        model_bytes = sum(len(array.data) for record in candidates.values() for array in record.values())
        verdict.update(asked=len(chosen), seconds=time.perf_counter() - started,
                       **{"bytes-sent": model_bytes * len(chosen)})
        if verdict["by"] == "proxy":
            log(WARNING, "fl-distill: round %d: fusion check: no valid reply from the %d node(s) asked (%d failed, %d "
                "rejected, %d silent); the proxy criterion keeps the %s model", server_round, len(chosen),
                len(verdict["failed"]), len(verdict["rejected"]), len(chosen) - len(replies), proxy_choice)
        else:
            log(INFO, "fl-distill: round %d: fusion check%s: %s kept (clients' accuracy %s), %d of %d node(s), %d "
                "examples", server_round, f" of family {family!r}" if named else "", verdict["kept"],
                ", ".join(f"{name} {acc:.4f}" for name, acc in verdict["accuracy"].items()),
                verdict["answered"], len(chosen), verdict["examples"])
        for rejection in verdict["rejected"]:
            log(WARNING, "fl-distill: round %d: fusion check: the reply of node %d does not count: %s",
                server_round, rejection["node-id"], rejection["reason"])
        return verdict
