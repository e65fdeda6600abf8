"""Stand-ins for what a ServerApp gets from Flower, for tests of the strategy layers on hand-made replies."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict


class FakeGrid:
    """A Grid that only knows which nodes are connected."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


def train_reply(arrays: dict[str, np.ndarray], node_id: int, metrics: dict) -> Message:
    """A client's train reply as it arrives at the server (needs the ``serverapp_identity`` fixture)."""
    request = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=request)
