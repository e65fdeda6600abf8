"""ShortPollGrid: replies collected as they arrive, within the round timeout."""

import time
from types import SimpleNamespace

import pytest

from server.reply_poll import ShortPollGrid


class ScriptedGrid:
    """A Grid whose replies arrive at given seconds after the push; records every pull."""

    def __init__(self, arrival: dict[str, float]):
        self.arrival = arrival
        self.pulls: list[set[str]] = []

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return list(self.arrival)

    def pull_messages(self, message_ids):
        ids = set(message_ids)
        self.pulls.append(ids)
        now = time.monotonic() - self.pushed_at
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m)) for m in ids if self.arrival[m] <= now]


def test_returns_as_soon_as_the_last_reply_arrives():
    grid = ScriptedGrid({"a": 0.05, "b": 0.3})
    started = time.monotonic()
    replies = ShortPollGrid(grid, poll_interval=0.05).send_and_receive([], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert time.monotonic() - started < 0.6  # Flower's HttpGrid would wait for its next 3 s poll


def test_a_replied_message_is_never_pulled_again():
    grid = ScriptedGrid({"a": 0.0, "b": 0.25})
    ShortPollGrid(grid, poll_interval=0.05).send_and_receive([], timeout=60)
    assert grid.pulls[0] == {"a", "b"} and all(ids == {"b"} for ids in grid.pulls[1:])


def test_the_timeout_bounds_the_wait_and_keeps_the_replies_received():
    grid = ScriptedGrid({"a": 0.0, "late": 30.0})
    started = time.monotonic()
    replies = ShortPollGrid(grid, poll_interval=0.05).send_and_receive([], timeout=0.5)
    assert 0.45 < time.monotonic() - started < 1.5
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]


def test_a_poll_interval_of_zero_is_refused():
    with pytest.raises(ValueError, match="poll_interval = 0"):
        ShortPollGrid(ScriptedGrid({}), poll_interval=0)
