"""Image references normalise the way Docker's do (distribution/reference grammar)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudless.errors import InvalidInput
from cloudless.sandbox.reference import InvalidReference, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text, registry, repository, tag, digest",
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("library/busybox", "docker.io", "library/busybox", "latest", None),
        ("user/app:v1", "docker.io", "user/app", "v1", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/user/app", "docker.io", "user/app", "latest", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/app:1", "localhost:5000", "app", "1", None),
        ("127.0.0.1:5000/team/app", "127.0.0.1:5000", "team/app", "latest", None),
        ("ghcr.io/org/sub/app:2.0-rc.1", "ghcr.io", "org/sub/app", "2.0-rc.1", None),
        ("Registry/app", "Registry", "app", "latest", None),  # uppercase first component is a host
        (f"busybox@{D}", "docker.io", "library/busybox", None, D),
        (f"busybox:1.36@{D}", "docker.io", "library/busybox", "1.36", D),
        (f"host:5000/a/b:t@{D}", "host:5000", "a/b", "t", D),
        ("a__b/c-d.e_f", "docker.io", "a__b/c-d.e_f", "latest", None),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
    ],
)
def test_references_normalise_like_docker(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_digest_wins_over_tag_for_what_is_fetched():
    ref = parse_reference(f"busybox:1.36@{D}")
    assert ref.manifest_ref == D
    assert ref.tagged == "docker.io/library/busybox:1.36"
    assert str(ref) == f"docker.io/library/busybox:1.36@{D}"


def test_docker_hub_api_host_and_familiar_name():
    ref = parse_reference("busybox")
    assert ref.api_host == "registry-1.docker.io"
    assert ref.familiar == "busybox:latest"
    assert parse_reference("127.0.0.1:5000/x").api_host == "127.0.0.1:5000"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("user/App", "lowercase"),
        ("busybox:", "invalid tag"),
        ("busybox:-bad", "invalid tag"),
        ("busybox:" + "a" * 129, "invalid tag"),
        ("busybox@sha256:abc", "invalid digest"),
        ("busybox@md5:" + "a" * 32, "invalid digest"),
        ("busybox@sha256:" + "AB" * 32, "invalid digest"),
        ("a//b", "empty path component"),
        ("/a", "empty path component"),
        ("a/", "empty path component"),
        ("a b", "whitespace"),
        ("-a", "invalid repository path"),
        ("a..b", "invalid repository path"),
        ("host:port:x/app", "invalid registry host"),
        ("@" + D, "no repository"),
        ("x/" + "a" * 300, "longer than"),
    ],
)
def test_bad_references_raise_invalid_reference_naming_the_problem(text, fragment):
    with pytest.raises(InvalidReference) as err:
        parse_reference(text)
    assert fragment in err.value.message
    assert isinstance(err.value, InvalidInput) and err.value.exit_code == 2


@given(st.text(max_size=60))
def test_arbitrary_text_either_parses_or_raises_invalid_reference(text):
    try:
        ref = parse_reference(text)
    except InvalidReference:
        return
    # Whatever parses round-trips through its canonical form.
    assert parse_reference(str(ref)) == ref
