"""A ServerApp for ``bench.faults`` only: the shipped ServerApp, with chosen client updates corrupted on arrival.

Production code carries no fault switch. ``bench.faults`` writes a copy of the
app whose ``serverapp`` is this module and starts the SuperLink with
``FL_DISTILL_BENCH_FAULTS`` set, e.g. ``nan@2,shape@3,scale@4``: in round 2 the
first train reply pulled gets NaN weights, in round 3 a tensor of another shape,
in round 4 every weight multiplied by 1e30; ``examples@R`` leaves the weights and
claims 10**12 training examples (a client that lies to own FedAvg's mean). Everything else (transport, the
real clients' training, validation, aggregation) is the shipped code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, Context, Message
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from server import server_app
from server.reply_poll import ShortPollGrid

FAULTS = ("nan", "shape", "scale", "examples")
CLAIMED_EXAMPLES = 10**12


def parse_plan(text: str) -> dict[int, str]:
    """``'nan@2,scale@4'`` → ``{2: 'nan', 4: 'scale'}`` (one fault per round)."""
    plan = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        fault, _, round_text = item.partition("@")
        if fault not in FAULTS or not round_text.isdigit():
            raise ValueError(f"FL_DISTILL_BENCH_FAULTS item {item!r}: use FAULT@ROUND with FAULT one of {FAULTS}")
        plan[int(round_text)] = fault
    return plan


def corrupt(reply: Message, fault: str) -> None:
    """Change ``reply``'s model (or, for ``examples``, its example count) in place as ``fault`` says."""
    if fault == "examples":
        metrics = next(iter(reply.content.metric_records.values()))
        metrics["num-examples"] = CLAIMED_EXAMPLES
        return
    record = next(iter(reply.content.array_records.values()))
    name = next(iter(record.keys()))
    if fault == "nan":
        values = record[name].numpy().copy()
        values.flat[0] = np.nan
        record[name] = Array(values)
    elif fault == "shape":
        values = record[name].numpy()
        record[name] = Array(np.zeros((values.size + 1,), values.dtype))
    else:  # scale
        for key in list(record.keys()):
            record[key] = Array(record[key].numpy() * np.float32(1e30))


class CorruptingGrid(ShortPollGrid):
    """Delegates to the real Grid; corrupts the first train reply pulled in each planned round."""

    def __init__(self, grid: Grid, plan: dict[int, str]):
        super().__init__(grid)
        self.plan = plan
        self.round_of: dict[str, int] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        for message_id, message in zip(ids, messages):
            if message.metadata.message_type == "train":
                self.round_of[message_id] = int(message.content["config"]["server-round"])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            server_round = self.round_of.get(reply.metadata.reply_to_message_id)
            if server_round in self.plan and not reply.has_error():
                fault = self.plan.pop(server_round)
                log(WARNING, "bench.faults: round %d: injecting %s into node %d's update",
                    server_round, fault, reply.metadata.src_node_id)
                corrupt(reply, fault)
        return replies


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    plan = parse_plan(os.environ.get("FL_DISTILL_BENCH_FAULTS", ""))
    server_app.main(CorruptingGrid(grid, plan), context)
