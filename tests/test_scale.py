"""Thousands of virtual clients in bounded memory: what the server side keeps per virtual client."""

import argparse

import pytest

from bench.scale import measure

pytestmark = pytest.mark.slow
PER_CLIENT_KB = 100  # bench.scale measured 13 KB of PSS per added client from 100 to 10,000 clients
SERVER_SIDE = ("flwr-simulation", "flower-superlink")  # the ServerApp with the simulation engine, the SuperLink


def test_the_server_side_grows_by_less_than_100_kb_per_virtual_client_from_200_to_2000(tmp_path):
    """Ray's actors are left out: there is one per CPU, whatever the number of clients, and their PSS
    alone varies by ~100 MB from run to run."""
    args = argparse.Namespace(per_round=10, rounds=2, examples=5, timeout=300)
    small, large = (measure(clients, args, tmp_path) for clients in (200, 2000))
    assert len(small["round-seconds"]) == len(large["round-seconds"]) == 2

    def server_side(result: dict) -> float:
        peaks = result["peak-pss-mb-by-program"]
        missing = [name for name in SERVER_SIDE if name not in peaks]
        assert not missing, f"no PSS sampled for {missing}: {sorted(peaks)}"
        return sum(peaks[name] for name in SERVER_SIDE)

    per_client_kb = 1024 * (server_side(large) - server_side(small)) / (2000 - 200)
    assert per_client_kb < PER_CLIENT_KB, (per_client_kb, small["peak-pss-mb-by-program"], large["peak-pss-mb-by-program"])
