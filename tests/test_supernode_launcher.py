"""fl-distill-supernode: where its warm executor connects, and the capped sleeps it gives Flower's SuperNode loop."""

import sys
import time

import pytest

from client.idle_backoff import IdleBackoff
from client.supernode import CappedSleep, executor_command, main


def test_executor_follows_the_supernodes_runtime_api_address_and_watches_its_pid():
    cmd = executor_command(["--insecure", "--superlink", "h:9092", "--port", "9300"], supernode_pid=4321,
                           task_poll=0.1, task_poll_max=2.0, idle_after=5.0)
    assert cmd[:3] == [sys.executable, "-m", "client.executor"]
    assert cmd[cmd.index("--runtime-api-address") + 1] == "127.0.0.1:9300"
    assert cmd[cmd.index("--parent-pid") + 1] == "4321" and "--insecure" in cmd
    assert cmd[cmd.index("--idle-poll-interval") + 1] == "2.0" and cmd[cmd.index("--idle-after") + 1] == "5.0"


@pytest.mark.parametrize("host, expected", [("0.0.0.0", "127.0.0.1:9094"), ("::", "[::1]:9094"), ("10.1.2.3", "10.1.2.3:9094")])
def test_a_wildcard_host_is_reached_on_loopback(host, expected):
    cmd = executor_command([f"--host={host}"], supernode_pid=1)
    assert cmd[cmd.index("--runtime-api-address") + 1] == expected


def test_a_runtime_api_with_tls_is_reached_with_its_ca():
    cmd = executor_command(["--ssl-ca-certfile", "/certs/ca.crt", "--ssl-certfile", "s.pem"], supernode_pid=1)
    assert cmd[cmd.index("--root-certificates") + 1] == "/certs/ca.crt" and "--insecure" not in cmd


def test_capped_sleep_shortens_long_sleeps_only_and_keeps_the_rest_of_time():
    capped = CappedSleep(0.05)
    started = time.monotonic()
    capped.sleep(3)
    capped.sleep(0.01)
    assert time.monotonic() - started < 0.5
    assert capped.monotonic is time.monotonic


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_idle_polls_stay_fast_for_idle_after_seconds_then_double_to_the_max_and_are_fast_at_the_next_work():
    clock = FakeClock()
    polls = IdleBackoff(0.2, 3.0, after=30, name="test", clock=clock)
    clock.now += 29.9
    assert polls.next_wait() == 0.2
    clock.now += 0.2
    assert [polls.next_wait() for _ in range(6)] == [0.4, 0.8, 1.6, 3.0, 3.0, 3.0]
    polls.work()
    assert polls.next_wait() == 0.2
    clock.now += 31
    assert polls.next_wait() == 0.4


def test_flowers_idle_sleep_waits_the_backoff_and_every_other_sleep_is_capped():
    clock = FakeClock()
    polls = IdleBackoff(0.02, 0.08, after=0, name="test", clock=clock)
    capped, started = CappedSleep(0.01, polls), time.monotonic()
    capped.sleep(3)  # Flower's idle sleep: the backoff's 0.04 s
    capped.sleep(0.5)  # Flower's reply wait: capped at 0.01 s
    assert 0.05 <= time.monotonic() - started < 0.5 and polls.current == 0.04


@pytest.mark.parametrize("fast, slow, after", [(0, 1, 1), (2, 1, 1), (0.1, 1, -1)])
def test_a_backoff_that_would_not_poll_is_refused(fast, slow, after):
    with pytest.raises(ValueError, match="is not allowed"):
        IdleBackoff(fast, slow, after, name="test")


@pytest.mark.parametrize("argv, message", [
    (["--isolation", "subprocess"], "--isolation subprocess does not go with --executor warm"),
    (["--idle-poll", "0"], "--idle-poll = 0.0 is not allowed"),
    (["--idle-poll-max", "0.1"], "--idle-poll-max = 0.1 is not allowed; use --idle-poll (0.2) to 60 seconds"),
    (["--task-poll-max", "0.05"], "--task-poll-max = 0.05 is not allowed; use --task-poll (0.1) to 60 seconds"),
    (["--idle-after", "-1"], "--idle-after = -1.0 is not allowed; use 0 to 3600 seconds"),
    (["--first-connect-wait", "-1"], "--first-connect-wait = -1.0 is not allowed; use 0 (no check) to 600 s"),
    (["--executor", "threads"], "invalid choice: 'threads'"),
    (["--executor", "subprocess", "--isolation", "process"], "would start no executor"),
    (["--node-config", 'model-dir=""'], "node config 'model-dir' = '' is not allowed; use a quoted folder path"),
    (["--node-config", "model-dir=5"], "node config 'model-dir' = 5 is not allowed"),
    (["--node-config", 'model-dir="/etc/passwd"'], "'/etc/passwd' is not allowed; use a quoted folder path that is not a file"),
    (["--node-config", 'device="gpu"'], "node config 'device' = 'gpu' is not allowed; use one of 'auto', 'cpu', 'cuda'"),
    (["--node-config", "partition-id=3 num-partitions=3"], "partition-id = 3 must be below num-partitions = 3"),
    (["--node-config", "partition-id=1"], "has partition-id but not num-partitions"),
    (["--node-config", 'model_dir="x"'], "unknown key(s) 'model_dir'; known keys: partition-id,"),
    (["--node-config", "model-dir=models"], "The provided configuration string is in an invalid format"),
])
def test_bad_launcher_options_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_help_lists_the_launchers_own_options_before_flowers(capsys, monkeypatch):
    import flwr.supernode.start_client_internal as supernode_loop

    for name in ("time", "pull_objects"):  # main() patches them, as it does in a SuperNode process
        monkeypatch.setattr(supernode_loop, name, getattr(supernode_loop, name))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.index("--idle-poll") < out.index("--superlink") and "--task-poll" in out
    assert "--first-connect-wait" in out and "--idle-after" in out


@pytest.mark.parametrize("address", ["nohost:abc", "9094", "host:0", "host:70000"])
def test_the_executor_refuses_a_runtime_api_address_that_is_not_host_port(address, capsys):
    from client.executor import main as executor_main

    with pytest.raises(SystemExit) as exit_info:
        executor_main(["--runtime-api-address", address, "--insecure"])
    assert exit_info.value.code == 2 and f"--runtime-api-address = {address!r} is not allowed" in capsys.readouterr().err
