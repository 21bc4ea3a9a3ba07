"""Time handling for the PKI: every instant is an aware UTC datetime.

Functions take `now` as an argument (tests pin it); only `utc_now` reads the
wall clock, and only callers at the edge use it as a default.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(instant: datetime, what: str = "now") -> datetime:
    """`instant` in UTC; naive datetimes are refused because X.509 times are absolute."""
    if not isinstance(instant, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(instant).__name__}")
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {instant.isoformat()}")
    return instant.astimezone(UTC)
