"""Listeners handed in by systemd: a socket unit's socket and the fd store's copy of
the same socket arrive both, and are served once."""

from __future__ import annotations

import os
import socket

import pytest

from forkd.sockets import close_listeners, open_listeners


def test_the_same_socket_passed_twice_is_served_once_under_its_first_name() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound:
        bound.bind(("127.0.0.1", 0))
        bound.listen()
        first, copy = os.dup(bound.fileno()), os.dup(bound.fileno())
        listeners = open_listeners((), 128, 0o660, [(first, "web"), (copy, "127.0.0.1_80")])
        try:
            assert [(lst.name, lst.address) for lst in listeners] == [
                ("web", f"127.0.0.1:{bound.getsockname()[1]}")]
            assert listeners[0].label == f"fd://{first} (web)"
            with pytest.raises(OSError):  # the duplicate is closed, not leaked
                os.fstat(copy)
        finally:
            close_listeners(listeners)
