"""FastCDC chunking: content-defined cuts, streaming equivalence, digests."""

from __future__ import annotations

import itertools
import os
import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless.blobs.chunking import ChunkDigest, ChunkingParams, chunk_iter, chunk_refs
from cloudless.blobs.errors import InvalidDigest

SMALL = ChunkingParams(16 * 1024)


def test_chunks_cover_the_input_exactly_and_respect_size_bounds():
    data = random.Random(1).randbytes(2 << 20)
    refs = chunk_refs(data, SMALL)
    assert refs[0].offset == 0
    assert all(a.offset + a.size == b.offset for a, b in itertools.pairwise(refs))
    assert refs[-1].offset + refs[-1].size == len(data)
    assert all(SMALL.min_size <= r.size <= SMALL.max_size for r in refs[:-1])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=200_000), min_size=1, max_size=40), st.integers(0, 2**32))
def test_feeding_in_any_pieces_cuts_like_the_whole_buffer(piece_sizes, seed):
    data = random.Random(seed).randbytes(sum(piece_sizes))
    pieces, at = [], 0
    for n in piece_sizes:
        pieces.append(data[at : at + n])
        at += n
    streamed = [(off, bytes(c)) for off, c in chunk_iter(pieces, SMALL)]
    whole = [(off, bytes(c)) for off, c in chunk_iter([data], SMALL)]
    assert streamed == whole


def test_an_insertion_changes_only_nearby_chunks():
    """The point of content-defined chunking (FastCDC paper §1): shifted content re-synchronises."""
    rng = random.Random(7)
    data = rng.randbytes(4 << 20)
    edited = data[: 1 << 20] + b"inserted bytes" + data[1 << 20 :]
    before = {r.digest for r in chunk_refs(data, SMALL)}
    after = [r.digest for r in chunk_refs(edited, SMALL)]
    changed = [d for d in after if d not in before]
    assert len(changed) <= 3
    assert len(after) > 100


def test_digest_is_sha256_and_validated():
    assert ChunkDigest.of(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert ChunkDigest("a" * 64) == "a" * 64
    for bad in ("A" * 64, "a" * 63, "g" * 64, ""):
        with pytest.raises(InvalidDigest):
            ChunkDigest(bad)


def test_chunking_params_refuse_sizes_out_of_range():
    with pytest.raises(msgspec.ValidationError):
        ChunkingParams(1000)
    with pytest.raises(msgspec.ValidationError):
        ChunkingParams(1 << 22)


def test_empty_input_has_no_chunks():
    assert chunk_refs(b"") == []
    assert list(chunk_iter([b"", b""])) == []


def test_default_average_chunk_is_about_one_mib():
    refs = chunk_refs(os.urandom(24 << 20))
    mean = sum(r.size for r in refs) / len(refs)
    assert 0.75 * (1 << 20) < mean < 2.5 * (1 << 20)
