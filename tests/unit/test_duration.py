"""Durations (`10s`, `500ms`, `1h30m`, seconds): the parser reads what the
formatter writes, sums its terms, and refuses anything else with an error
naming the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless.duration import InvalidDuration, format_duration, parse_duration
from cloudless.errors import InvalidInput

MAX = 30 * 86400.0


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("30m1h", 5400.0),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        ("0.1h", 360.0),
        ("90", 90.0),
        ("0.25", 0.25),
        (" 15m ", 900.0),
        (45, 45.0),
        (2.5, 2.5),
        ("0s", 0.0),
    ],
)
def test_parses_units_and_plain_seconds(text, seconds):
    assert parse_duration(text, field="f") == seconds


@pytest.mark.parametrize(
    "text, why",
    [
        ("10x", "'10x' is not a duration"),
        ("", "'' is not a duration"),
        ("-5s", "'-5s' is not a duration"),
        ("1h30", "'1h30' is not a duration"),
        ("h", "'h' is not a duration"),
        ("1s1s", "gives the unit s twice"),
        ("1e3", "'1e3' is not a duration"),
        ("inf", "'inf' is not a duration"),
        ("31d", "must be ≤ 30d"),
        ("9" * 65, "is longer than 64 characters"),
        (True, "True is not a duration"),
        (float("nan"), "is not a finite duration"),
        (-1, "must be ≥ 0s"),
    ],
)
def test_rejects_with_the_field_named(text, why):
    with pytest.raises(InvalidDuration) as info:
        parse_duration(text, field="health_check.interval_s")
    assert info.value.message.startswith("health_check.interval_s: ")
    assert why in info.value.message, info.value.message
    assert info.value.context == {"field": "health_check.interval_s"}
    assert isinstance(info.value, InvalidInput) and info.value.exit_code == 2


def test_bounds_are_the_callers():
    assert parse_duration("1h", field="f", minimum=1, maximum=3600) == 3600
    with pytest.raises(InvalidDuration, match=r"f: must be ≤ 1h"):
        parse_duration("61m", field="f", maximum=3600)
    with pytest.raises(InvalidDuration, match=r"f: must be ≥ 1s"):
        parse_duration("500ms", field="f", minimum=1)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0s"),
        (0.5, "500ms"),
        (10, "10s"),
        (5400, "1h30m"),
        (90061.001, "1d1h1m1s1ms"),
        (1e-4, "0.0001"),
        (1e-6, "0.000001"),
        (2.5e-7, "0s"),
    ],
)
def test_formats_the_shortest_text(seconds, text):
    assert format_duration(seconds) == text


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=int(MAX * 1000)))
def test_whole_milliseconds_round_trip_through_the_text(millis):
    seconds = millis / 1000
    assert parse_duration(format_duration(seconds), field="f") == seconds


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0, max_value=MAX, allow_nan=False, allow_infinity=False))
def test_any_seconds_round_trip_through_the_text_to_the_microsecond(seconds):
    assert parse_duration(format_duration(seconds), field="f") == round(seconds, 6)


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0, max_value=MAX, allow_nan=False, allow_infinity=False))
def test_numbers_are_seconds_exactly(seconds):
    assert parse_duration(seconds, field="f") == seconds


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["d", "h", "m", "s", "ms"]), st.integers(min_value=0, max_value=999), min_size=1
    ).filter(lambda terms: terms.get("d", 0) <= 29),
    st.randoms(use_true_random=False),
)
def test_terms_in_any_order_sum(terms, rnd):
    size = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
    order = list(terms)
    rnd.shuffle(order)
    text = "".join(f"{terms[u]}{u}" for u in order)
    expected = round(sum(terms[u] * size[u] for u in terms), 9)
    if expected > MAX:
        with pytest.raises(InvalidDuration):
            parse_duration(text, field="f")
        return
    seconds = parse_duration(text, field="f")
    assert seconds == expected
    assert parse_duration(format_duration(seconds), field="f") == seconds


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_garbage_raises_invalid_duration_only(text):
    try:
        seconds = parse_duration(text, field="f")
    except InvalidDuration:
        return
    assert 0 <= seconds <= MAX
