"""Thousands of virtual clients in bounded memory: what the server side keeps per virtual client."""

import argparse

import pytest

from bench.scale import measure

pytestmark = pytest.mark.slow
PER_CLIENT_KB = 100  # bench.scale measured 11 KB of anonymous memory per added client from 200 to 2,000 clients
SERVER_SIDE = ("flwr-simulation", "flower-superlink")  # the ServerApp with the simulation engine, the SuperLink


def test_the_server_side_grows_by_less_than_100_kb_per_virtual_client_from_200_to_2000(tmp_path):
    """The server side's anonymous memory (its heap: what it keeps per client) is measured, not its PSS:
    the ServerApp's PSS shares torch's pages with Ray's workers, whose count varies, and moved by -35 to
    +142 KB a client between runs of this very test. Ray's actors are left out: there is one per CPU,
    whatever the number of clients."""
    args = argparse.Namespace(per_round=10, rounds=2, examples=5, timeout=300)
    small, large = (measure(clients, args, tmp_path) for clients in (200, 2000))
    assert len(small["round-seconds"]) == len(large["round-seconds"]) == 2

    def server_side(result: dict) -> float:
        peaks = result["peak-anon-mb-by-program"]
        missing = [name for name in SERVER_SIDE if name not in peaks]
        assert not missing, f"no memory sampled for {missing}: {sorted(peaks)}"
        return sum(peaks[name] for name in SERVER_SIDE)

    per_client_kb = 1024 * (server_side(large) - server_side(small)) / (2000 - 200)
    assert per_client_kb < PER_CLIENT_KB, (per_client_kb, small["peak-anon-mb-by-program"], large["peak-anon-mb-by-program"])
