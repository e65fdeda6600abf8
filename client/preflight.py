"""Before a SuperNode's first connection: is a SuperLink there, and does it speak the transport asked for?

``flower-supernode`` retries a failed first connection for ever and prints only
``Connection attempt failed, retrying in 19.87 seconds``: the same line whether nothing
listens at ``--superlink``, the SuperLink speaks TLS and ``--insecure`` was given, or the
server's certificate was not signed by the ``--root-certificates`` CA. ``check_superlink``
tells these apart with one TCP connection and one TLS handshake (Python's ``ssl``, ALPN
``h2`` as gRPC offers it), and raises ``PreflightError`` naming the address, the cause and
the flag to change. It never sends a gRPC request, so the SuperLink sees only a closed
connection.
"""

from __future__ import annotations

import socket
import ssl
import time

HANDSHAKE_TIMEOUT = 5.0  # seconds for one TLS handshake once TCP is connected
HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH (OpenSSL)


class PreflightError(Exception):
    """A first connection that cannot succeed as configured; the message says why and what to change."""


def split_address(address: str) -> tuple[str, int]:
    """``'host:port'`` or ``'[v6]:port'`` → ``(host, port)``; ``ValueError`` naming it otherwise."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--superlink {address!r} is not HOST:PORT (e.g. 127.0.0.1:9092 or [::1]:9092)")
    return host, int(port)


def connect(host: str, port: int, wait: float) -> socket.socket | None:
    """A TCP connection to ``host:port``, retried every 0.5 s for up to ``wait`` seconds; ``None`` if none."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return socket.create_connection((host, port), timeout=min(5.0, max(wait, 0.5)))
        except OSError:  # refused, unreachable, a name not resolvable yet (compose DNS)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)


def handshake(sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
    """One TLS handshake on ``sock`` (closed after); errors as ``ssl``/``OSError`` raise them."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    with context.wrap_socket(sock, server_hostname=server_hostname):
        pass


def tls_context(root_certificates: str | None) -> ssl.SSLContext:
    """The context gRPC's channel amounts to: verify against the CA file (else the system's), ALPN h2."""
    try:
        context = ssl.create_default_context(cafile=root_certificates)
    except (OSError, ssl.SSLError) as err:
        raise PreflightError(f"--root-certificates {root_certificates!r} cannot be read as PEM certificates "
                             f"({err}): give the CA certificate file (e.g. docker/certs/supernodes/ca.crt)") from err
    context.set_alpn_protocols(["h2"])
    return context


def check_superlink(address: str, *, insecure: bool, root_certificates: str | None, wait: float,
                    fail_if_absent: bool = True) -> None:
    """Raise ``PreflightError`` if a SuperNode with these flags cannot connect to ``address``.

    ``wait``: seconds to keep trying TCP while nothing listens. ``fail_if_absent=False``
    (Flower's ``--max-retries``/``--max-wait-time`` given) leaves an absent SuperLink to
    Flower's own retries. A handshake that times out proves nothing and passes.
    """
    host, port = split_address(address)
    sock = connect(host, port, wait)
    if sock is None:
        if fail_if_absent:
            raise PreflightError(
                f"nothing is listening at {address} (no TCP connection for {wait:g} s): start the SuperLink first, "
                f"check --superlink, or give Flower's --max-wait-time SECONDS to keep retrying")
        return
    if insecure:
        probe = ssl.create_default_context()
        probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
        probe.set_alpn_protocols(["h2"])
        try:
            handshake(sock, probe, host)
        except (OSError, ssl.SSLError):
            return  # a plaintext gRPC server drops a TLS ClientHello: as --insecure expects
        raise PreflightError(f"the SuperLink at {address} speaks TLS but --insecure was given: drop --insecure and "
                             f"give --root-certificates CA.crt (the CA that signed its certificate)")
    context = tls_context(root_certificates)
    ca = f"--root-certificates {root_certificates}" if root_certificates else "this machine's system CAs"
    try:
        handshake(sock, context, host)
    except ssl.SSLCertVerificationError as err:
        if err.verify_code == HOSTNAME_MISMATCH:
            raise PreflightError(f"the SuperLink's certificate at {address} is not valid for {host!r} "
                                 f"({err.verify_message}): dial a name among its SANs, or remake it with "
                                 f"docker/make-certs.sh --san DNS:{host} (or IP:{host})") from err
        raise PreflightError(f"the SuperLink's certificate at {address} was not signed by {ca} "
                             f"({err.verify_message}): give --root-certificates the CA that signed it "
                             f"(the ca.crt made with the SuperLink's certificate)") from err
    except TimeoutError:
        return  # no answer within the handshake timeout: not proof of a mismatch
    except (OSError, ssl.SSLError) as err:
        raise PreflightError(f"the SuperLink at {address} does not speak TLS ({err}): give --insecure if it was "
                             f"started with --insecure, or start it with its certificates") from err
