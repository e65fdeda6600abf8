"""fl-distill-supernode: where its warm executor connects, and the capped sleeps it gives Flower's SuperNode loop."""

import sys
import time

import pytest

from client.supernode import CappedSleep, executor_command, main


def test_executor_follows_the_supernodes_runtime_api_address_and_watches_its_pid():
    cmd = executor_command(["--insecure", "--superlink", "h:9092", "--port", "9300"], supernode_pid=4321)
    assert cmd[:3] == [sys.executable, "-m", "client.executor"]
    assert cmd[cmd.index("--runtime-api-address") + 1] == "127.0.0.1:9300"
    assert cmd[cmd.index("--parent-pid") + 1] == "4321" and "--insecure" in cmd


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


@pytest.mark.parametrize("argv, message", [
    (["--isolation", "subprocess"], "--isolation subprocess does not go with --executor warm"),
    (["--idle-poll", "0"], "--idle-poll = 0.0 is not allowed"),
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
    assert "--first-connect-wait" in out


@pytest.mark.parametrize("address", ["nohost:abc", "9094", "host:0", "host:70000"])
def test_the_executor_refuses_a_runtime_api_address_that_is_not_host_port(address, capsys):
    from client.executor import main as executor_main

    with pytest.raises(SystemExit) as exit_info:
        executor_main(["--runtime-api-address", address, "--insecure"])
    assert exit_info.value.code == 2 and f"--runtime-api-address = {address!r} is not allowed" in capsys.readouterr().err
