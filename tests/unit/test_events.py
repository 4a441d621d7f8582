"""The worker channel's codec: what the worker encodes, the primary decodes to the
same typed value; anything else decodes to None, never to an exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkd import events
from forkd.events import Beat, Draining, Failed, LimitReached, Ready, decode, encode


@pytest.mark.parametrize("msg", [
    Ready("asgi", "/srv/app/releases/42"), Ready(), Beat(0), Beat(123456789),
    LimitReached(1000), Draining(), Failed("Traceback ...\nRuntimeError: bö\n"),
])
def test_every_worker_message_round_trips(msg: events.WorkerMessage) -> None:
    assert decode(encode(msg)) == msg


def test_the_wire_forms_are_short_and_stable() -> None:
    assert encode(Beat(7)) == b'hb {"requests":7,"metrics":null}'
    assert decode(b'hb {"requests":7}') == Beat(7)  # a beat without a metrics snapshot
    assert encode(Draining()) == b"draining"
    assert encode(LimitReached(50)) == b'limit {"requests":50}'


@pytest.mark.parametrize("data", [
    b"", b"hb 12", b'hb {"requests":"12"}', b'hb {"requests":true}',
    b'hb {"requests":1,"extra":2}', b"hb []", b"hb {", b"nope", b'ready {"interface":3}',
    b'error {"error":null}', b"\xff\xfe",
])
def test_malformed_datagrams_decode_to_none(data: bytes) -> None:
    assert decode(data) is None


def test_an_old_worker_that_leaves_out_a_field_still_decodes() -> None:
    assert decode(b'ready {"interface":"wsgi"}') == Ready("wsgi", None)


def test_a_huge_error_text_still_fits_one_datagram() -> None:
    text = "é\n" * events.MAX_ERROR
    data = encode(Failed(text[-events.MAX_ERROR:]))
    assert len(data) < 212_992  # the default unix datagram limit (net.core.wmem_default)


def test_a_tag_is_registered_once() -> None:
    with pytest.raises(ValueError):
        events.message("hb")(type("Again", (), {}))


@given(st.binary(max_size=200))
def test_decode_never_raises(data: bytes) -> None:
    decode(data)
