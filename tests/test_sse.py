import pytest

from trio_sync.errors import ProtocolError
from trio_sync.protocol import sse
from trio_sync.protocol.sse import SSEParser, format_comment, format_event


def test_format_event_fields_and_multiline_data() -> None:
    frame = format_event('{"a": 1}\nsecond', event="change", id="42")
    assert frame == b'id: 42\nevent: change\ndata: {"a": 1}\ndata: second\n\n'


def test_format_event_refuses_newlines_in_id() -> None:
    with pytest.raises(ValueError, match="id"):
        format_event("x", id="1\n2")


def test_parser_round_trips_split_at_every_byte() -> None:
    stream = (
        b"retry: 1000\n"
        + format_comment("hi")
        + format_event("one", event="change", id="1")
        + format_event("two\nlines", event="change", id="2")
        + format_event("no id")
    )
    parser = SSEParser()
    events = []
    for i in range(len(stream)):
        events.extend(parser.feed(stream[i : i + 1]))
    assert [(e.event, e.data, e.id) for e in events] == [
        ("change", "one", "1"),
        ("change", "two\nlines", "2"),
        ("message", "no id", "2"),  # the last event id persists, as the spec says
    ]
    assert parser.retry_ms == 1000


@pytest.mark.parametrize("newline", [b"\r\n", b"\r", b"\n"])
def test_parser_accepts_every_line_ending(newline: bytes) -> None:
    raw = newline.join([b"id: 7", b"event: change", b"data:x", b"", b""])
    parser = SSEParser()
    events = parser.feed(raw[:5]) + parser.feed(raw[5:])
    assert [(e.event, e.data, e.id) for e in events] == [("change", "x", "7")]


def test_parser_bounds_line_length(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "MAX_LINE_BYTES", 100)
    parser = SSEParser()
    with pytest.raises(ProtocolError, match="longer"):
        parser.feed(b"data: " + b"x" * 200)
