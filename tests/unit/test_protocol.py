"""The control protocol, without sockets: what goes on the wire and what is refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkd.errors import ProtocolError
from forkd.protocol import (
    COMMANDS,
    MAX_FRAME,
    PROTOCOL_VERSION,
    ErrorReply,
    OkReply,
    ProgressReply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    parse_scale,
    peek_id,
)


def frame(**fields: object) -> bytes:
    body = {"v": PROTOCOL_VERSION, "id": "r1", "command": "status", "args": {}} | fields
    return json.dumps(body).encode()


def code_of(data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_request(data)
    return info.value.code


def test_mutating_commands_are_exactly_reload_scale_stop() -> None:
    assert {name for name, mutates in COMMANDS.items() if mutates} == {"reload", "scale", "stop",
                                                                  "upgrade"}
    assert {name for name, mutates in COMMANDS.items() if not mutates} == {"ping", "status", "logs"}


@pytest.mark.parametrize(
    "request_",
    [
        Request("a", "ping"),
        Request("b", "status"),
        Request("c", "reload"),
        Request("d", "scale", {"count": "-2"}),
        Request("e", "stop", {"graceful": False}),
    ],
)
def test_request_round_trip(request_: Request) -> None:
    assert decode_request(encode_request(request_)) == request_


def test_stop_defaults_to_graceful_and_args_may_be_omitted() -> None:
    assert decode_request(frame(command="stop")).args == {"graceful": True}
    body = {"v": PROTOCOL_VERSION, "id": "r", "command": "reload"}
    assert decode_request(json.dumps(body).encode()) == Request("r", "reload", {})


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xff\xfe\x00garbage", "bad-json"),
        (b"not json at all", "bad-json"),
        (b"", "bad-json"),
        (b'{"v": 1, "id": "x", "command": "status", "args": {"n": NaN}}', "bad-json"),
        (b"[" * 40_000 + b"]" * 40_000, "too-large"),
        (b"[" * 30_000 + b"]" * 30_000, "bad-json"),  # nested past the stack, under the cap
        (b"[1, 2]", "bad-request"),
        (b'"status"', "bad-request"),
        (frame(v=2), "bad-version"),
        (frame(v=None), "bad-version"),
        (frame(id=""), "bad-request"),
        (frame(id=7), "bad-request"),
        (frame(id="x" * 500), "bad-request"),
        (frame(command=["status"]), "bad-request"),
        (frame(command="format-disk"), "unknown-command"),
        (frame(extra=1), "bad-request"),
        (frame(args=[]), "bad-args"),
        (frame(args={"verbose": True}), "bad-args"),
        (frame(command="scale", args={}), "bad-args"),
        (frame(command="scale", args={"count": 3}), "bad-args"),
        (frame(command="scale", args={"count": "three"}), "bad-args"),
        (frame(command="scale", args={"count": "++3"}), "bad-args"),
        (frame(command="scale", args={"count": "٣"}), "bad-args"),  # a non-ASCII digit
        (frame(command="stop", args={"graceful": "yes"}), "bad-args"),
    ],
)
def test_malformed_requests_are_refused_with_a_code(data: bytes, code: str) -> None:
    assert code_of(data) == code


def test_oversized_frame_is_refused_before_parsing() -> None:
    data = frame(command="status", padding="x" * MAX_FRAME)
    assert len(data) > MAX_FRAME
    assert code_of(data) == "too-large"


def test_unknown_command_message_names_the_known_ones() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(frame(command="restart"))
    assert "'restart'" in info.value.message and "reload" in info.value.message


def test_encode_request_refuses_bad_args_so_no_bad_frame_is_sent() -> None:
    with pytest.raises(ProtocolError) as info:
        encode_request(Request("a", "scale", {"count": "lots"}))
    assert info.value.code == "bad-args"


def test_peek_id_recovers_the_id_of_a_refused_request() -> None:
    assert peek_id(frame(command="format-disk", id="abc")) == "abc"
    assert peek_id(b"not json") is None
    assert peek_id(frame(id=5)) is None


@pytest.mark.parametrize(
    "reply",
    [
        OkReply("a", {"pid": 1, "workers": [{"id": 0, "rss": 123}]}),
        ErrorReply("b", "busy", "busy: reload in progress (3/8)"),
        ErrorReply(None, "bad-json", "not valid JSON"),
        ProgressReply("c", "slot 2/8: pid 10 → 11, ready in 180 ms"),
    ],
)
def test_reply_round_trip(reply: OkReply | ErrorReply | ProgressReply) -> None:
    assert decode_reply(encode_reply(reply)) == reply


def test_reply_that_json_cannot_carry_raises_instead_of_sending_nan() -> None:
    with pytest.raises(ValueError):
        encode_reply(OkReply("a", {"cpu_percent": float("nan")}))


@pytest.mark.parametrize(
    "data",
    [
        b"{}",
        b'{"v": 1, "id": "a", "kind": "ok"}',
        b'{"v": 1, "id": "a", "kind": "ok", "result": []}',
        b'{"v": 1, "id": "a", "kind": "progress"}',
        b'{"v": 1, "id": "a", "kind": "error", "code": "x"}',
        b'{"v": 1, "id": "a", "kind": "shrug"}',
        b'{"v": 9, "id": "a", "kind": "ok", "result": {}}',
        b'{"v": 1, "kind": "ok", "result": {}}',
    ],
)
def test_malformed_replies_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(data)


@pytest.mark.parametrize(
    ("text", "current", "expected"),
    [("4", 2, 4), ("+2", 2, 4), ("-2", 4, 2), ("-0", 3, 3), ("+0", 3, 3), ("1", 8, 1)],
)
def test_parse_scale(text: str, current: int, expected: int) -> None:
    assert parse_scale(text, current) == expected


@pytest.mark.parametrize(
    ("text", "current", "words"),
    [
        ("-2", 2, "cannot scale to 0 workers (now 2)"),
        ("0", 5, "cannot scale to 0"),
        ("-10", 4, "cannot scale to -6"),
        ("abc", 4, "expected N, +N or -N"),
        ("", 4, "expected N, +N or -N"),
        ("1e3", 4, "expected N, +N or -N"),
    ],
)
def test_parse_scale_refuses(text: str, current: int, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_scale(text, current)
    assert info.value.code == "bad-args"
    assert words in info.value.message


def test_parse_scale_respects_a_maximum() -> None:
    assert parse_scale("+4", 4, maximum=8) == 8
    with pytest.raises(ProtocolError, match="the most forkd runs is 8"):
        parse_scale("+5", 4, maximum=8)


def test_scale_is_bounded_by_default_and_the_error_names_the_bound() -> None:
    assert parse_scale("1024", 4) == 1024
    with pytest.raises(ProtocolError, match="cannot scale to 999999 workers: the most "
                                            "forkd runs is 1024"):
        parse_scale("999999", 4)
    with pytest.raises(ProtocolError, match="the most forkd runs is 1024"):
        parse_scale("+1", 1024)


@given(st.binary(max_size=2048))
def test_decode_request_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        decode_request(data)
    except ProtocolError as exc:
        assert exc.code in {"bad-json", "bad-request", "bad-version", "unknown-command",
                            "bad-args", "too-large"}


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                     max_size=4),
        max_leaves=20,
    )
)
def test_decode_request_of_any_json_value(value: object) -> None:
    for data in (json.dumps(value).encode(), frame(args=value), frame(id=value)):
        try:
            decode_request(data)
        except ProtocolError:
            pass
