"""A misconfigured SuperNode fails fast: fl-distill-supernode names the cause of a first connection
that cannot succeed (nothing listening, TLS against --insecure, a CA that did not sign the
SuperLink's certificate, TLS asked of a plaintext SuperLink) instead of retrying for ever."""

import socket
import subprocess
import time

import pytest

from client.preflight import PreflightError, check_superlink, split_address
from scripts import launch

TLS = launch.Ports(http=8700, fleet=9792)
PLAIN = launch.Ports(http=8710, fleet=9802)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_tcp(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"flower-superlink exited with {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"nothing listened on {port} within {seconds} s")


@pytest.fixture(scope="module")
def superlinks(tmp_path_factory):
    """A TLS SuperLink and a plaintext one on 127.0.0.1, and two CAs: the one that signed the TLS
    SuperLink's certificate and another."""
    root = tmp_path_factory.mktemp("preflight")
    for name in ("certs", "other"):
        subprocess.run(["bash", str(launch.REPO / "docker" / "make-certs.sh"), "-n", "1", str(root / name)],
                       check=True, capture_output=True)
    certs = root / "certs" / "superlink"
    tls_cmd = [launch.bin_path("flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
               "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
               "--host", "127.0.0.1", "--port", str(TLS.http), "--fleet-api-address", f"127.0.0.1:{TLS.fleet}"]
    processes = []
    try:
        processes.append(launch.start(tls_cmd, root / "tls" / "superlink.log", launch.flower_env(root / "tls")))
        wait_for_tcp(TLS.fleet, processes[-1])
        processes.append(launch.start_superlink(root / "plain", PLAIN, simulation=False))
        wait_for_tcp(PLAIN.fleet, processes[-1])
        yield {"ca": certs / "ca.crt", "other-ca": root / "other" / "ca.crt"}
    finally:
        launch.stop(processes)


def supernode(home, *args: str, timeout: float = 40) -> tuple[int, str, float]:
    """Run fl-distill-supernode with ``args`` (FLWR_HOME ``home``); its exit code, stderr and wall seconds."""
    started = time.monotonic()
    done = subprocess.run([launch.bin_path("fl-distill-supernode"), *args], capture_output=True, text=True,
                          timeout=timeout, env=launch.flower_env(home))
    return done.returncode, done.stderr, time.monotonic() - started


def test_nothing_listening_exits_within_the_wait_naming_the_address_and_the_flag(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    code, err, seconds = supernode(tmp_path, "--first-connect-wait", "2", "--insecure", "--superlink", address)
    assert code != 0 and seconds < 30
    assert f"nothing is listening at {address}" in err and "--max-wait-time" in err


def test_insecure_against_a_tls_superlink_exits_within_30_s_naming_tls(superlinks, tmp_path):
    address = f"127.0.0.1:{TLS.fleet}"
    code, err, seconds = supernode(tmp_path, "--insecure", "--superlink", address)
    assert code != 0 and seconds < 30
    assert f"the SuperLink at {address} speaks TLS but --insecure was given" in err and "--root-certificates" in err


def test_a_ca_that_did_not_sign_the_superlinks_certificate_exits_naming_it(superlinks, tmp_path):
    code, err, seconds = supernode(tmp_path, "--root-certificates", str(superlinks["other-ca"]),
                                   "--superlink", f"127.0.0.1:{TLS.fleet}")
    assert code != 0 and seconds < 30
    assert f"was not signed by --root-certificates {superlinks['other-ca']}" in err


def test_the_right_ca_and_a_name_in_the_certificate_pass(superlinks):
    for host in ("127.0.0.1", "localhost"):
        check_superlink(f"{host}:{TLS.fleet}", insecure=False, root_certificates=str(superlinks["ca"]), wait=5)


def test_a_plaintext_superlink_passes_insecure_and_refuses_tls(superlinks):
    address = f"127.0.0.1:{PLAIN.fleet}"
    check_superlink(address, insecure=True, root_certificates=None, wait=5)
    with pytest.raises(PreflightError, match=f"the SuperLink at {address} does not speak TLS"):
        check_superlink(address, insecure=False, root_certificates=str(superlinks["ca"]), wait=5)


def test_flowers_own_retry_flags_leave_an_absent_superlink_to_flower():
    check_superlink(f"127.0.0.1:{free_port()}", insecure=True, root_certificates=None, wait=0.5,
                    fail_if_absent=False)


@pytest.mark.parametrize("address", ["9092", "host:", ":9092", "host:0", "host:99999", "host:x"])
def test_an_address_that_is_not_host_port_is_refused_naming_it(address):
    with pytest.raises(ValueError, match=f"--superlink {address!r} is not HOST:PORT"):
        split_address(address)


def test_a_ca_file_that_is_not_pem_is_refused_naming_it(tmp_path, superlinks):
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate")
    with pytest.raises(PreflightError, match=f"--root-certificates {str(bad)!r} cannot be read"):
        check_superlink(f"127.0.0.1:{TLS.fleet}", insecure=False, root_certificates=str(bad), wait=5)
