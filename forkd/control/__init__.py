"""The ZeroMQ control channel: the primary's server and the CLI's client.

The server is a ROUTER the primary polls in its
own loop next to its pipes; authentication is a ZAP handler answered in that same loop,
so there is no thread. Who may talk to a primary:

* over ipc (the default), the peer's uid, which libzmq reads with SO_PEERCRED and passes
  to ZAP as the address "localhost:UID:GID:PID": only the primary's own euid and root;
* over tcp, which is refused without CURVE keys, a client whose CURVE public key is
  authorised (by default: the holder of the primary's own key pair).

Before any of that, the socket file is 0600 in a 0700 FORKD_HOME, so other users
normally cannot even connect; ZAP is the second wall, and the one that holds when an
operator loosens the file modes.

A primary owns its endpoint through an flock on "<socket>.lock" held for its whole life:
a second primary with the same name fails to take the lock and says who holds it, and a
socket file left by a dead primary (whose lock died with it) is removed and re-bound.

This package is the only place that imports zmq: home.py (FORKD_HOME rules), auth.py
(ZAP and CURVE), server.py (the primary's side), client.py (the CLI's side).
"""

from forkd.control.auth import (
    CurveKeys,
    Peer,
    Verdict,
    create_curve_keys,
    curve_from_env,
    load_curve_keys,
    zap_verdict,
)
from forkd.control.client import call, list_primaries, resolve
from forkd.control.home import (
    default_home,
    endpoint_for,
    ensure_home,
    ipc_listening,
    ipc_path,
)
from forkd.control.server import ControlServer, Poller

__all__ = [
    "ControlServer", "CurveKeys", "Poller", "Peer", "Verdict", "call", "create_curve_keys",
    "curve_from_env", "default_home", "endpoint_for", "ensure_home", "ipc_listening",
    "ipc_path", "list_primaries", "load_curve_keys", "resolve", "zap_verdict",
]
