import random
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from cloudless.pki.ca import ClusterCA
from cloudless.pki.errors import InvalidCredentials, TokenRejected
from cloudless.pki.tokens import TokenRecord, create_token, hash_secret, parse_token, pin_matches

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca():
    return ClusterCA.create("c1", NOW)


def new_token(ca, role="node", ttl=timedelta(hours=1), max_uses=2):
    return create_token(ca.fingerprint, role, ttl, max_uses, NOW)


def reason(record, secret, role, now):
    with pytest.raises(TokenRejected) as info:
        record.check(secret, role, now)
    return info.value.reason


def test_token_parses_to_id_secret_and_ca_fingerprint(ca):
    text, record = new_token(ca)
    parsed = parse_token(text)
    assert parsed.id == record.id
    assert parsed.ca_fingerprint == ca.fingerprint
    record.check(parsed.secret, "node", NOW)


def test_record_stores_only_a_hash_of_the_secret(ca):
    text, record = new_token(ca)
    secret = parse_token(text).secret
    assert record.secret_hash == hash_secret(secret)
    assert secret.encode() not in record.to_bytes()
    assert secret not in repr(parse_token(text))


def test_secrets_carry_128_random_bits_and_differ(ca):
    secrets_seen = {parse_token(new_token(ca)[0]).secret for _ in range(20)}
    assert len(secrets_seen) == 20
    assert all(len(s) == 26 for s in secrets_seen)


def test_seeded_rng_makes_tokens_reproducible(ca):
    a = create_token(ca.fingerprint, "node", timedelta(hours=1), 1, NOW, rng=random.Random(5))
    b = create_token(ca.fingerprint, "node", timedelta(hours=1), 1, NOW, rng=random.Random(5))
    assert a == b


def test_wrong_secret_is_forged_even_when_token_is_also_expired(ca):
    _text, record = new_token(ca)
    other_secret = parse_token(new_token(ca)[0]).secret
    assert reason(record, other_secret, "node", NOW) == "forged"
    assert reason(record, other_secret, "node", NOW + timedelta(days=1)) == "forged"


def test_token_past_its_ttl_is_expired(ca):
    text, record = new_token(ca, ttl=timedelta(minutes=10))
    secret = parse_token(text).secret
    record.check(secret, "node", NOW + timedelta(minutes=9))
    assert reason(record, secret, "node", NOW + timedelta(minutes=10)) == "expired"


def test_token_is_used_up_after_max_uses(ca):
    text, record = new_token(ca, max_uses=2)
    secret = parse_token(text).secret
    record.check(secret, "node", NOW)
    record = record.consumed()
    record.check(secret, "node", NOW)
    record = record.consumed()
    assert record.uses == 2
    assert reason(record, secret, "node", NOW) == "used_up"


def test_node_token_cannot_enrol_an_admin(ca):
    text, record = new_token(ca, role="node")
    assert reason(record, parse_token(text).secret, "admin", NOW) == "wrong_role"
    text, record = new_token(ca, role="admin")
    assert reason(record, parse_token(text).secret, "node", NOW) == "wrong_role"


def test_record_bytes_round_trip_and_refuse_garbage(ca):
    _, record = new_token(ca)
    assert TokenRecord.from_bytes(record.consumed().to_bytes()) == record.consumed()
    with pytest.raises(InvalidCredentials):
        TokenRecord.from_bytes(b"\x81\xa2id\xa1x")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(role="root"),
        dict(ttl=timedelta(0)),
        dict(ttl=timedelta(days=31)),
        dict(max_uses=0),
        dict(fingerprint="sha256:abc"),
    ],
)
def test_create_token_refuses_bad_parameters(ca, kwargs):
    args = dict(role="node", ttl=timedelta(hours=1), max_uses=1, fingerprint=ca.fingerprint) | kwargs
    with pytest.raises(ValueError):
        create_token(args["fingerprint"], args["role"], args["ttl"], args["max_uses"], NOW)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "cl1",
        "cl2.abcdefgh.abcdefghijklmnopqrstuvwxyz." + "0" * 64,
        "cl1.abcdefg.abcdefghijklmnopqrstuvwxyz." + "0" * 64,
        "cl1.abcdefgh.abcdefghijklmnopqrstuvwxy." + "0" * 64,
        "cl1.abcdefgh.abcdefghijklmnopqrstuvwxyz." + "0" * 63,
        "cl1.ABCDEFGH.abcdefghijklmnopqrstuvwxyz." + "0" * 64,
        "cl1.abcdefgh.abcdefghijklmnopqrstuvwxy1." + "0" * 64,
        "cl1.abcdefgh.abcdefghijklmnopqrstuvwxyz." + "g" * 64,
        "cl1.abcdefgh.abcdefghijklmnopqrstuvwxyz." + "0" * 64 + ".x",
    ],
)
def test_malformed_token_strings_are_refused(text):
    with pytest.raises(TokenRejected) as info:
        parse_token(text)
    assert info.value.reason == "malformed"


@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_is_malformed(text):
    try:
        parsed = parse_token(text)
    except TokenRejected as exc:
        assert exc.reason == "malformed"
    else:
        assert parsed.ca_fingerprint.startswith("sha256:")


@given(data=st.data())
def test_mutated_valid_tokens_parse_or_are_malformed(ca, data):
    text, record = new_token(ca)
    position = data.draw(st.integers(0, len(text) - 1))
    replacement = data.draw(st.characters())
    mutated = text[:position] + replacement + text[position + 1 :]
    try:
        parsed = parse_token(mutated)
    except TokenRejected as exc:
        assert exc.reason == "malformed"
        return
    if mutated != text and parsed.id == record.id and parsed.ca_fingerprint == ca.fingerprint:
        # Only the secret changed: the record refuses it.
        with pytest.raises(TokenRejected) as info:
            record.check(parsed.secret, "node", NOW)
        assert info.value.reason == "forged"


def test_pin_matches_the_ca_in_any_encoding(ca):
    text, _ = new_token(ca)
    fingerprint = parse_token(text).ca_fingerprint
    assert pin_matches(ca.certificate, fingerprint)
    assert pin_matches(ca.certificate_pem, fingerprint)
    assert pin_matches(ca.certificate.public_bytes(serialization.Encoding.DER), fingerprint)
    assert pin_matches(ca.certificate, fingerprint.removeprefix("sha256:").upper())


def test_pin_refuses_another_ca_and_garbage(ca):
    fingerprint = parse_token(new_token(ca)[0]).ca_fingerprint
    impostor = ClusterCA.create("c1", NOW)
    assert not pin_matches(impostor.certificate_pem, fingerprint)
    assert not pin_matches(b"garbage", fingerprint)
    assert not pin_matches(ca.certificate_pem, "sha256:xyz")


def test_redeem_checks_then_counts_one_use(ca):
    text, record = new_token(ca, max_uses=1)
    secret = parse_token(text).secret
    stored = record.redeem(secret, "node", NOW)
    assert stored.uses == 1 and record.uses == 0
    with pytest.raises(TokenRejected) as info:
        stored.redeem(secret, "node", NOW)
    assert info.value.reason == "used_up"
