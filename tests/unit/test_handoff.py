"""The upgrade handshake between an old primary and its successor, over a real
socketpair (no processes): what each side hears, and garbage or an end of file."""

from __future__ import annotations

import socket
import subprocess
import sys

from forkd import handoff


def pair() -> tuple[handoff.Successor, handoff.Predecessor, subprocess.Popen[bytes]]:
    old_end, new_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    old_end.setblocking(False)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])  # a stand-in pid
    proc.wait()
    return handoff.Successor(proc, old_end), handoff.Predecessor(new_end.detach()), proc


def test_ready_then_take() -> None:
    successor, predecessor, _ = pair()
    assert successor.read() == []
    predecessor.ready()
    assert successor.read() == [("ready", "")]
    assert not predecessor.told_to_take()
    successor.take()
    assert successor.closed and predecessor.told_to_take()
    predecessor.close()


def test_a_failure_carries_its_reason_and_a_silent_end_is_gone() -> None:
    successor, predecessor, _ = pair()
    predecessor.failed("cannot import app:main:\nModuleNotFoundError: No module named 'x'")
    assert successor.read() == [
        ("failed", "cannot import app:main:\nModuleNotFoundError: No module named 'x'")]
    assert successor.read() == []  # said once; the end of file adds nothing
    successor.close()

    successor, predecessor, _ = pair()
    predecessor.close()
    assert successor.read() == [("gone", "")] and successor.said == "gone"
    successor.close()


def test_garbage_on_the_handshake_is_ignored() -> None:
    assert handoff.decode(b"not json") is None
    assert handoff.decode(b'["ready"]') is None
    assert handoff.decode(b'{"state": 1}') is None
    assert handoff.decode(handoff.encode("failed", "why")) == ("failed", "why")
    successor, predecessor, _ = pair()
    predecessor.sock.setblocking(True)
    predecessor.sock.sendall(b"\x00garbage\n{}\n" + handoff.encode("ready"))
    assert successor.read() == [("ready", "")]
    successor.close()
    predecessor.close()


def test_the_listeners_variable_is_read_once_and_removed() -> None:
    environ = {handoff.LISTENERS_ENV: '[[5, "127.0.0.1:8000"], [6, "unix:/run/web.sock"]]'}
    assert handoff.inherited_listeners(environ) == [(5, "127.0.0.1:8000"),
                                                    (6, "unix:/run/web.sock")]
    assert environ == {}
    assert handoff.inherited_listeners(environ) is None
    assert handoff.inherited_listeners({handoff.LISTENERS_ENV: "[[5]"}) == []
