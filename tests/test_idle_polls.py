"""An idle SuperNode backs its polls off and is fast again with work, measured from the SuperLink's
side: with ``FLWR_LOG_LEVEL=DEBUG`` the SuperLink logs every ``PullMessages`` with a timestamp."""

import re
import time
from datetime import datetime

import pytest

from scripts import launch

pytestmark = pytest.mark.slow
PORTS = launch.Ports(http=8180, fleet=9322)  # apart from test_deployment.py's
CONNECTION = "test-idle-polls"
FAST, SLOW, AFTER = 0.2, 1.0, 3.0  # the node's --idle-poll, --idle-poll-max and --idle-after
STAMPED = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*?\[Fleet\.(PullMessages\] node_id|PushMessages\] Push replies)")


def fleet_calls(log: str, kind: str) -> list[datetime]:
    """When the SuperLink logged each ``PullMessages`` (``kind='PullMessages'``) or pushed reply."""
    return [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in STAMPED.finditer(log)
            if m.group(2).startswith(kind)]


def wait_for(path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not in {path} within {timeout} s"
        time.sleep(0.5)


def test_an_idle_supernode_polls_slowly_and_polls_fast_again_once_a_run_sends_it_work(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_LOG_LEVEL", "DEBUG")
    home = tmp_path / "flwr-home"
    launch.write_connection(home, CONNECTION, PORTS.address)
    processes = [launch.start_superlink(home, PORTS, simulation=False)]
    try:
        processes += launch.start_supernodes(home, PORTS, count=1, first_runtime_port=9330, extra=[
            "--idle-poll", str(FAST), "--idle-poll-max", str(SLOW), "--idle-after", str(AFTER)])
        node_log = home / "supernode-0.log"
        wait_for(node_log, f"fl-distill-supernode: idle for {AFTER:g} s; polls back off", timeout=90)
        wait_for(node_log, f"fl-distill-executor: idle for {AFTER:g} s; polls back off", timeout=90)
        time.sleep(3 * SLOW)  # 0.4, 0.8, 1.0 s: at the max
        idle_from = datetime.now()
        time.sleep(6)
        idle_to = datetime.now()
        run_id = launch.flwr_run(home, CONNECTION, 'num-server-rounds=1 min-nodes=1 distill="off"', stream=False)
        assert launch.wait_finished(home, CONNECTION, run_id, timeout=300) == "finished:completed"
        time.sleep(AFTER)
        superlink_log = (home / "superlink.log").read_text()
        pulls = fleet_calls(superlink_log, "PullMessages")
        last_reply = fleet_calls(superlink_log, "PushMessages")[-1]
        idle = sum(idle_from <= t < idle_to for t in pulls) / (idle_to - idle_from).total_seconds()
        after_work = sum(0 < (t - last_reply).total_seconds() <= 2 for t in pulls) / 2
        assert idle <= 1.3 / SLOW, f"{idle:.1f} pulls/s while idle; backed off would be {1 / SLOW:g}/s"
        assert after_work >= 0.6 / FAST, f"{after_work:.1f} pulls/s after the last reply; fast is {1 / FAST:g}/s"
        node = node_log.read_text()
        backed_off = node.index("fl-distill-supernode: idle for")
        assert node.index(f"fl-distill-supernode: work arrived; polling every {FAST:g} s again", backed_off)
        assert "fl-distill-executor: work arrived; polling every 0.1 s again" in node
    finally:
        launch.stop(processes)
