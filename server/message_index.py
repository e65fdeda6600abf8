"""Simulation past a few hundred virtual clients: an index of pending messages by destination node.

Flower 1.39's simulation engine asks its in-memory LinkState, every 0.1 s and for each of the N
virtual nodes in turn, for that node's next message (``add_messages_to_queue`` in
``flwr/server/superlink/fleet/vce/vce_api.py``). ``InMemoryLinkState.get_message_ins``
(``flwr/server/superlink/linkstate/in_memory_linkstate.py``) answers by scanning every pending
message and checking each one (TTL, federation membership) under the state's lock: N x M checks
per sweep for M pending messages. With 10,000 nodes that is 10^6 checks per sweep for a round of
100 clients, and 10^8 when every node is asked its partition, so round time follows the size of
the federation, not the sample.

:func:`index_pending_messages` gives one state instance the same two methods backed by a map
{node ID: its undelivered message IDs, in arrival order}: a node's lookup checks only that node's
messages, with Flower's own ``_check_stored_messages`` (expired or out-of-federation messages are
deleted as before) and Flower's own ``store_message_ins`` for every check on the way in. What a
node receives, in which order, and its ``delivered_at`` stamp are unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from logging import WARNING

from flwr.common import log, now

# What the index relies on in InMemoryLinkState (flwr 1.39); without them it leaves the state alone.
REQUIRED = ("lock", "message_ins_store", "store_message_ins", "get_message_ins", "_check_stored_messages")


def index_pending_messages(state) -> bool:
    """Replace ``state``'s ``store_message_ins``/``get_message_ins`` (on this instance only) with
    versions that keep and read a per-node index; returns whether it did. A state without the
    attributes in ``REQUIRED`` (another Flower version, a database-backed state) is left as it is,
    with a WARNING."""
    if missing := [name for name in REQUIRED if not hasattr(state, name)]:
        log(WARNING, "fl-distill: the LinkState (%s) lacks %s: pending messages are not indexed by node, and "
            "simulation rounds may slow down with many virtual clients", type(state).__name__, missing)
        return False
    if getattr(state, "_fl_distill_indexed", False):
        return True
    pending: defaultdict[int, dict[str, None]] = defaultdict(dict)  # dict: an ordered set of message IDs
    store_checked = state.store_message_ins
    with state.lock:
        for message_id, message in state.message_ins_store.items():
            if message.metadata.delivered_at == "":
                pending[message.metadata.dst_node_id][message_id] = None

    def store_message_ins(message):
        with state.lock:
            message_id = store_checked(message)  # Flower's validation; None when refused
            if message_id is not None and message_id in state.message_ins_store:
                pending[message.metadata.dst_node_id][message_id] = None
        return message_id

    def get_message_ins(node_id: int, limit: int | None, *, run_id: int | None = None) -> list:
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        if not pending.get(node_id):  # the sweep asks every node every 0.1 s: most have nothing, so no lock
            return []  # (a message stored meanwhile is found at the next sweep)
        found = []
        with state.lock:
            waiting = pending.get(node_id)
            if not waiting:
                return []
            state._check_stored_messages(set(waiting))  # deletes this node's expired messages, as Flower's scan does
            for message_id in list(waiting):
                message = state.message_ins_store.get(message_id)
                if message is None or message.metadata.delivered_at != "":
                    del waiting[message_id]  # deleted, expired or delivered: never returned again
                elif run_id is None or message.metadata.run_id == run_id:
                    found.append(message)
                    del waiting[message_id]
                    if limit and len(found) == limit:
                        break
            if not waiting:
                del pending[node_id]
        delivered_at = now().isoformat()
        for message in found:
            message.metadata.delivered_at = delivered_at
        return found

    state.store_message_ins, state.get_message_ins = store_message_ins, get_message_ins
    state._fl_distill_indexed = True
    return True
