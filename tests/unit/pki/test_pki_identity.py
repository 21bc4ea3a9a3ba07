import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudless.errors import InvalidInput
from cloudless.pki.errors import InvalidIdentity
from cloudless.pki.identity import Identity

LABEL = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,62}", fullmatch=True)


def test_uri_is_spiffe_cluster_kind_name():
    assert Identity("c1", "node", "n-1").uri == "spiffe://c1/node/n-1"
    assert Identity.client("c1", "alice").uri == "spiffe://c1/client/alice"


@given(cluster=LABEL, kind=st.sampled_from(["node", "client"]), name=LABEL)
def test_parse_inverts_uri(cluster, kind, name):
    identity = Identity(cluster, kind, name)
    assert Identity.parse(identity.uri) == identity


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "spiffe://c1",
        "spiffe://c1/node",
        "spiffe://c1/node/",
        "spiffe://c1/admin/x",
        "spiffe://C1/node/x",
        "spiffe://c1/node/X",
        "spiffe://c1/node/a/b",
        "spiffe://c1/node/x\n",
        "https://c1/node/x",
        "spiffe://c1/node/-x",
        "spiffe://c1/node/" + "a" * 64,
        "spiffe://c1/node/x?y",
    ],
)
def test_parse_refuses_anything_but_a_cloudless_identity(uri):
    with pytest.raises(InvalidIdentity):
        Identity.parse(uri)


def test_invalid_identity_is_invalid_input_with_usage_exit_code():
    with pytest.raises(InvalidInput) as info:
        Identity("c1", "node", "Bad Name")
    assert info.value.exit_code == 2
    assert info.value.context["field"] == "name"


@given(st.text(max_size=120))
def test_parse_of_arbitrary_text_returns_identity_or_raises_invalid_identity(text):
    try:
        identity = Identity.parse(text)
    except InvalidIdentity:
        return
    assert identity.uri == text
