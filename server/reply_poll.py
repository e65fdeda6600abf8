"""Replies picked up at once: a Grid whose ``send_and_receive`` polls every 0.1 s, not every 3 s."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

import flwr.superlink.grid.http_grid as http_grid
from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

# Retry a reply's not-yet-uploaded objects every 50-100 ms instead of after 1 s, 2 s,
# 4 s, ...; without a cap on tries, so Flower's 2 h limit (PULL_MAX_TIME) still holds.
OBJECT_PULL_RETRY = {"initial_backoff": 0.05, "backoff_cap": 0.1, "max_tries_per_object": None}


def pull_replies(grid: Grid, message_ids: Iterable[str], timeout: float | None,
                 poll_interval: float = 0.1) -> list[Message]:
    """The replies to the pushed messages ``message_ids`` (None entries, failed pushes, skipped), pulled every
    ``poll_interval`` seconds until all have arrived or ``timeout`` seconds (None: no limit) have passed. An
    ID whose reply has arrived is not pulled again (pulling it again would return a synthetic error reply)."""
    waiting = {mid for mid in message_ids if mid}
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        received = list(grid.pull_messages(waiting))
        replies.extend(received)
        waiting.difference_update(m.metadata.reply_to_message_id for m in received)
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        left = poll_interval if deadline is None else deadline - time.monotonic()
        time.sleep(max(0.0, min(poll_interval, left)))
    return replies


class ShortPollGrid(Grid):
    """Wraps the ServerApp's Grid; only ``send_and_receive`` differs.

    Flower 1.39's ``HttpGrid.send_and_receive`` (deployment) pushes the messages,
    then pulls replies every 3 s (``flwr/superlink/grid/http_grid.py``), so a
    round's train phase ends on the next multiple of 3 s after its last reply.
    This one does the same through the Grid's public ``push_messages`` /
    ``pull_messages`` every ``poll_interval`` seconds, keeping the timeout: it
    returns the replies received when all have arrived or ``timeout`` seconds
    have passed. An ID whose reply has arrived is not pulled again (pulling it
    again would return a synthetic error reply).

    A reply becomes visible before its objects (the model) have finished
    uploading; ``HttpGrid.pull_messages`` then retries each object after 1 s,
    2 s, ... (``pull_objects``' defaults). Constructing this Grid makes that
    module's retries come every 50-100 ms (same 2 h limit), in this ServerApp
    process only.
    """

    def __init__(self, grid: Grid, poll_interval: float = 0.1):
        if poll_interval <= 0:
            raise ValueError(f"poll_interval = {poll_interval} is not allowed; use seconds > 0")
        self.grid = grid
        self.poll_interval = poll_interval
        if not isinstance(http_grid.pull_objects, functools.partial):
            http_grid.pull_objects = functools.partial(http_grid.pull_objects, **OBJECT_PULL_RETRY)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return pull_replies(self.grid, self.grid.push_messages(messages), timeout, self.poll_interval)

    # Everything else is the wrapped Grid's.
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)
