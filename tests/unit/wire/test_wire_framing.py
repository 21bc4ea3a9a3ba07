"""Length-prefixed framing: round trips under any chunking, early refusal of
oversize frames, bounded buffering, and truncation detection."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudless.wire import (
    MAX_FRAME_SIZE,
    FrameDecoder,
    FrameTooLarge,
    Message,
    TruncatedFrame,
    WireError,
    decoder_for,
    encode,
    encode_frame,
)
from cloudless.wire.framing import HEADER_SIZE


def chunked(data, cuts):
    """Split `data` at the (sorted, deduplicated) positions in `cuts`."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


def test_frame_is_big_endian_length_then_payload():
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


@given(st.lists(st.binary(max_size=300), max_size=10), st.lists(st.integers(0, 10_000), max_size=20))
def test_frames_round_trip_under_any_chunking(payloads, cuts):
    stream = b"".join(encode_frame(p) for p in payloads)
    decoder = FrameDecoder(max_frame_size=300)
    out = []
    for piece in chunked(stream, cuts):
        out.extend(decoder.feed(piece))
    assert out == payloads
    assert decoder.at_boundary and decoder.buffered == 0
    decoder.end()


def test_oversize_header_is_refused_before_any_body_arrives():
    decoder = FrameDecoder(max_frame_size=1024)
    assert decoder.feed(b"\x00\x00") == []
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"\x04\x01")
    assert info.value.size == 1025 and info.value.limit == 1024
    assert decoder.buffered == 0


def test_frames_before_an_oversize_header_are_lost_with_the_stream_and_decoder_stays_failed():
    decoder = FrameDecoder(max_frame_size=8)
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_frame(b"ok") + b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_frame(b"later"))


def test_default_limit_refuses_a_4gib_claim():
    with pytest.raises(FrameTooLarge) as info:
        FrameDecoder().feed(b"\xff\xff\xff\xff")
    assert info.value.limit == MAX_FRAME_SIZE


def test_frame_of_exactly_the_limit_is_accepted():
    decoder = FrameDecoder(max_frame_size=5)
    assert decoder.feed(encode_frame(b"12345", max_frame_size=5)) == [b"12345"]


def test_encode_refuses_oversize_payload():
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 11, max_frame_size=10)


def test_end_inside_a_frame_is_truncated():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"hello")[:6])
    assert not decoder.at_boundary
    with pytest.raises(TruncatedFrame):
        decoder.end()
    header_only = FrameDecoder()
    header_only.feed(b"\x00\x00")
    with pytest.raises(TruncatedFrame):
        header_only.end()


@given(st.lists(st.binary(max_size=64), max_size=30))
def test_random_bytes_yield_frames_or_frame_too_large_and_buffer_stays_bounded(chunks):
    limit = 100
    decoder = FrameDecoder(max_frame_size=limit)
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
        except FrameTooLarge:
            assert decoder.buffered == 0
            return
        assert all(len(f) <= limit for f in frames)
        assert decoder.buffered < limit + HEADER_SIZE


class Note(Message):
    text: str


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_random_stream_through_framing_and_codec_raises_only_wire_errors(chunks):
    decoder = FrameDecoder(max_frame_size=64)
    codec = decoder_for(Note)
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                try:
                    codec.decode(frame)
                except WireError:
                    pass
        decoder.end()
    except WireError:
        pass


def test_message_in_a_frame_round_trips():
    decoder = FrameDecoder()
    [frame] = decoder.feed(encode_frame(encode(Note(text="hi"))))
    assert decoder_for(Note).decode(frame) == Note(text="hi")


def test_invalid_max_frame_size_is_refused():
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_size=2**32)
