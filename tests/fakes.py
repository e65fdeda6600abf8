"""Stand-ins for what a ServerApp gets from Flower, for tests of the strategy layers on hand-made replies."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict


class FakeGrid:
    """A Grid that knows which nodes are connected and answers ``query`` messages with the real ClientApp handler.

    ``node_configs`` gives a node's own config (e.g. a pinned ``partition-id``);
    nodes in ``silent`` never answer. Messages sent are kept in ``sent``.
    """

    def __init__(self, node_ids, node_configs: dict | None = None, silent: tuple = ()):
        self.node_ids, self.node_configs, self.silent = node_ids, node_configs or {}, set(silent)
        self.sent: list[Message] = []

    def get_node_ids(self):
        return self.node_ids

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Context, RecordDict as State

        from client.client_app import report_partition

        messages = list(messages)
        self.sent += messages
        return [report_partition(m, Context(run_id=1, node_id=m.metadata.dst_node_id, state=State(), run_config={},
                                            node_config=self.node_configs.get(m.metadata.dst_node_id, {})))
                for m in messages if m.metadata.dst_node_id not in self.silent]


def train_reply(arrays: dict[str, np.ndarray], node_id: int, metrics: dict) -> Message:
    """A client's train reply as it arrives at the server (needs the ``serverapp_identity`` fixture)."""
    request = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=request)
