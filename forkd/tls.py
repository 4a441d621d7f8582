"""TLS for the workers' TCP listeners (`--certfile`, `--keyfile`, `--ca-certs`).

Each worker builds its own context when it starts, before it reports ready: a reload
therefore serves certificates renewed on disk, and a file that does not load fails the
new worker the way an import error does (the reload stops, the old workers keep serving).
"""

from __future__ import annotations

import socket
import ssl

from forkd.config import Config
from forkd.errors import TLSConfigError

__all__ = ["TLSConfigError", "is_tcp", "server_context"]


def server_context(config: Config) -> ssl.SSLContext | None:
    """The worker's server-side context, or None without --certfile."""
    if config.certfile is None:
        return None
    # the ssl module's server defaults: no SSLv3/TLS 1.0/1.1 ciphers, no compression,
    # OpenSSL's secure cipher list; then TLS 1.2 as the floor on every OpenSSL
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.certfile, config.keyfile)
    except (OSError, ssl.SSLError) as exc:
        files = config.certfile + (f", --keyfile {config.keyfile}" if config.keyfile else "")
        raise TLSConfigError(f"TLS: cannot load --certfile {files}: {_why(exc)}") from None
    if config.ca_certs is not None:
        try:
            context.load_verify_locations(cafile=config.ca_certs)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(
                f"TLS: cannot load --ca-certs {config.ca_certs}: {_why(exc)}") from None
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, no connection
    context.set_alpn_protocols(["http/1.1"])
    return context


_SSL_REASONS = {  # OpenSSL's terse reasons, said the way an operator needs them
    "PEM lib": "not a PEM certificate or key (or a key protected by a passphrase)",
    "KEY_VALUES_MISMATCH": "the private key does not belong to the certificate",
    "NO_CERTIFICATE_OR_CRL_FOUND": "no certificate in the file",
}


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        if not reason and "PEM lib" in str(exc):
            reason = "PEM lib"
        return _SSL_REASONS.get(reason, reason or str(exc))
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def is_tcp(sock: socket.socket) -> bool:
    """TLS goes on TCP listeners only; a unix socket is a local proxy's."""
    return sock.family in (socket.AF_INET, socket.AF_INET6)
