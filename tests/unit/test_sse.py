"""SSE framing: events survive any chunking of the byte stream."""

from __future__ import annotations

import random

import pytest

from gateway.event_json import json_event, payload_of
from gateway.sse import SseEvent, SseParser, WholeEvents

STREAM = (
    b'event: response.created\ndata: {"a": 1}\n\n'
    b": keep-alive comment\n\n"
    b"data: line one\ndata: line two\n\n"
    b"data: caf\xc3\xa9\r\n\r\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SseEvent('{"a": 1}', "response.created"),
    SseEvent("line one\nline two"),
    SseEvent("caf\u00e9"),
    SseEvent("[DONE]"),
]


def parse(chunks: list[bytes]) -> list[SseEvent]:
    parser = SseParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + list(parser.flush())


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, len(STREAM)])
def test_any_chunk_size_gives_the_same_events(size):
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert parse(chunks) == EXPECTED


def test_split_inside_a_multibyte_character_and_crlf():
    cut = STREAM.index(b"\xc3") + 1
    assert parse([STREAM[:cut], STREAM[cut:]]) == EXPECTED


def test_final_event_without_blank_line_is_flushed():
    assert parse([b"data: tail"]) == [SseEvent("tail")]


def test_encode_round_trips():
    events = [SseEvent("x\ny", "ev"), json_event({"k": "v"}), SseEvent("[DONE]")]
    wire = b"".join(e.encode() for e in events)
    assert parse([wire]) == events
    assert events[2].is_done and not events[0].is_done
    assert payload_of(events[1]) == {"k": "v"}


def test_plain_events_keep_their_wire_bytes_for_pass_through():
    wire = b'data: {"a": 1}\n\n'
    (event,) = parse([wire])
    assert event.raw == wire and event.encode() == wire
    (named,) = parse([b"event: x\ndata: y\n\n"])
    assert named.raw is None and named.encode() == b"event: x\ndata: y\n\n"
    split = parse([wire[:5], wire[5:]])
    assert split == [event] and split[0].encode() == wire


def test_changed_events_are_encoded_again():
    (event,) = parse([b"data: old\n\n"])
    changed = SseEvent("new", event.event)
    assert changed.raw is None and changed.encode() == b"data: new\n\n"


@pytest.mark.parametrize(
    "chunk",
    [b"data: x\n\n", b"data: \n\n", b"data: a\r\n\r\n", b"data: a\rb\n\n", b"data: a\nb\n\n",
     b"data: a\n\ndata: b\n\n", b"data:a\n\n", b"data: caf\xc3\n\n", b"event: e\ndata: a\n\n",
     b"data: a\n", b": comment\n\n"],
)  # fmt: skip
def test_a_whole_event_per_chunk_parses_as_byte_by_byte(chunk):
    """A chunk holding exactly one `data:` event takes a shortcut; any other chunk must not,
    and either way the events (and their pass-through bytes) are what one byte at a time
    gives, also after an event left open by the previous chunk."""
    whole = parse([chunk])
    bytewise = parse([chunk[i : i + 1] for i in range(len(chunk))])
    assert whole == bytewise
    assert [e.encode() for e in whole] == [e.encode() for e in bytewise]
    opened = b"data: open\n"
    assert parse([opened, chunk]) == parse([opened + chunk])


def whole_pieces(chunks: list[bytes]) -> list[bytes]:
    framing = WholeEvents()
    return [piece for chunk in chunks for piece in framing.feed(chunk)] + list(framing.flush())


@pytest.mark.parametrize("seed", range(20))
def test_whole_event_pieces_are_the_bytes_cut_only_between_events(seed):
    """Any chunking of a stream (LF, CRLF and CR line ends, comments, named and multi-line
    events) comes out as the same bytes, every piece ending an event: parsing the pieces
    one by one gives the events of the whole stream."""
    generator = random.Random(seed)
    cuts = sorted(generator.sample(range(1, len(STREAM)), generator.randint(0, 12)))
    chunks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
    pieces = whole_pieces(chunks)
    assert b"".join(pieces) == STREAM
    assert all(piece.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")) for piece in pieces)
    assert [event for piece in pieces for event in parse([piece])] == EXPECTED


def test_whole_event_pieces_hold_a_partial_event_and_end_a_last_one():
    assert whole_pieces([b"data: a\n\ndata: b"]) == [b"data: a\n\n", b"data: b\n\n"]
    assert whole_pieces([b"data: a\n", b"\ndata: b\r", b"\r"]) == [b"data: a\n\n", b"data: b\r\r"]
    assert whole_pieces([b"data: a\n\n", b"\n"]) == [b"data: a\n\n"]  # no event is left
    framing = WholeEvents()
    assert framing.feed(b'data: {"half') == ()
    assert framing.feed(b'": 1}\n\n') == (b'data: {"half": 1}\n\n',)
