"""The per-node index of pending messages (server/message_index.py) on Flower's own in-memory LinkState,
set up as Flower's simulation sets it up (flwr/simulation/run_simulation.py, vce_api._register_nodes)."""

import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from server.message_index import index_pending_messages

RUN_ID = 1  # the run the serverapp_identity fixture's messages belong to


def federation(nodes: int, indexed: bool):
    """(grid, state, node IDs in registration order) of a fresh simulated federation."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=RUN_ID)
    run.federation_id, run.primary_task_id = NOOP_FEDERATION_ID, 1
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=RUN_ID)
    node_ids = list(_register_nodes(nodes, factory))
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    if indexed:
        assert index_pending_messages(state)
    return grid, state, node_ids


def push(grid, node_ids, sends: list[tuple[int, int]], ttl: float = 60) -> None:
    """Send message k to node_ids[position] for each (position, k)."""
    grid.push_messages([Message(RecordDict({"c": ConfigRecord({"k": k})}), dst_node_id=node_ids[position],
                                message_type="query", ttl=ttl) for position, k in sends])


def delivered(state, node_ids, position: int, limit=1) -> list[int]:
    return [int(m.content.config_records["c"]["k"]) for m in state.get_message_ins(node_ids[position], limit=limit)]


@pytest.mark.usefixtures("serverapp_identity")
def test_each_node_gets_the_same_messages_in_the_same_order_as_from_flowers_scan():
    sends = [(k % 5, k) for k in range(40)] + [(0, 100), (4, 101)]
    answers = []
    for indexed in (False, True):
        grid, state, nodes = federation(6, indexed)
        push(grid, nodes, sends)
        seen = [delivered(state, nodes, p, limit=2) for p in range(6) for _ in range(6)]
        push(grid, nodes, [(5, 200), (2, 201)])  # more arrive after a sweep
        seen += [delivered(state, nodes, p, limit=None) for p in range(6)]
        again = [delivered(state, nodes, p, limit=None) for p in range(6)]  # delivered once only
        answers.append((seen, again))
    assert answers[0] == answers[1]
    assert sorted(k for got in answers[1][0] for k in got) == sorted([k for _, k in sends] + [200, 201])
    assert answers[1][1] == [[]] * 6


@pytest.mark.usefixtures("serverapp_identity")
def test_an_expired_message_is_deleted_and_never_delivered_as_flower_does():
    grid, state, nodes = federation(3, indexed=True)
    push(grid, nodes, [(1, 1)], ttl=0.2)
    push(grid, nodes, [(1, 2)])
    time.sleep(0.4)
    assert delivered(state, nodes, 1, limit=None) == [2]
    assert state.num_message_ins() == 1  # the expired one is gone from the store


@pytest.mark.usefixtures("serverapp_identity")
def test_a_sweep_of_every_node_costs_per_pending_message_of_that_node_not_of_the_federation():
    """Flower's engine asks every node every 0.1 s; 3,000 nodes with 3,000 messages pending (round 1's
    partition query) take 9e6 checks per sweep in Flower's scan."""
    seconds = {}
    for indexed in (False, True):
        grid, state, nodes = federation(3000, indexed)
        push(grid, nodes, [(p, p) for p in range(0, 3000, 10)])  # 300 pending
        started = time.perf_counter()
        for node in nodes:
            state.get_message_ins(node, limit=1)
        seconds[indexed] = time.perf_counter() - started
    assert seconds[True] < 0.5 and seconds[True] * 10 < seconds[False], seconds


def test_a_state_it_does_not_know_is_left_alone_with_a_warning(caplog):
    class Other:
        lock = None

    assert not index_pending_messages(Other())
    assert "not indexed by node" in caplog.text
