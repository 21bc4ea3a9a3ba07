"""Registry pull protocol (OCI distribution spec v2) against an in-memory
registry served through httpx.MockTransport: auth challenges (RFC 7235 /
Docker token auth), index resolution, digest checks, error mapping, rollback."""

import base64
import json

import httpx
import pytest

from cloudless.sandbox import oci
from cloudless.sandbox.imagebuild import BuiltImage, TarBuilder, host_architecture
from cloudless.sandbox.images import ImageStore
from cloudless.sandbox.oci import DigestMismatch, InvalidImage
from cloudless.sandbox.registry import (
    ManifestNotFound,
    RegistryClient,
    RegistryError,
    RegistryUnauthorized,
    RegistryUnavailable,
    RepositoryNotFound,
    parse_www_authenticate,
)

HOST = "registry.test"


def test_www_authenticate_bearer_parameters():
    [ch] = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert ch.scheme == "bearer"
    assert ch.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull",
    }


def test_www_authenticate_multiple_challenges_tokens_and_escapes():
    chs = parse_www_authenticate('Basic realm="a \\"quoted\\" realm", Bearer realm=https://t/x,error=invalid_token')
    assert [c.scheme for c in chs] == ["basic", "bearer"]
    assert chs[0].params["realm"] == 'a "quoted" realm'
    assert chs[1].params == {"realm": "https://t/x", "error": "invalid_token"}


def test_www_authenticate_garbage_is_a_registry_error():
    with pytest.raises(RegistryError):
        parse_www_authenticate("=== nonsense")


class FakeRegistry:
    """Serves one repository; `auth` is None, "bearer" or "basic"."""

    def __init__(self, image: BuiltImage, repo="team/app", tag="v1", auth=None, index=False):
        self.image = image
        self.repo = repo
        self.tag = tag
        self.auth = auth
        self.blobs = image.blobs()
        self.manifests = {image.manifest_digest: (image.manifest, oci.OCI_MANIFEST)}
        self.top = image.manifest_digest
        if index:
            other = json.dumps(
                {
                    "schemaVersion": 2,
                    "config": {"mediaType": oci.OCI_CONFIG, "digest": "sha256:" + "0" * 64, "size": 1},
                    "layers": [],
                }
            ).encode()
            doc = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": oci.OCI_INDEX,
                    "manifests": [
                        {
                            "mediaType": oci.OCI_MANIFEST,
                            "digest": oci.sha256_digest(other),
                            "size": len(other),
                            "platform": {"os": "linux", "architecture": "s390x"},
                        },
                        {
                            "mediaType": oci.OCI_MANIFEST,
                            "digest": image.manifest_digest,
                            "size": len(image.manifest),
                            "platform": {"os": "linux", "architecture": host_architecture()},
                        },
                    ],
                }
            ).encode()
            self.top = oci.sha256_digest(doc)
            self.manifests[self.top] = (doc, oci.OCI_INDEX)
            self.manifests[oci.sha256_digest(other)] = (other, oci.OCI_MANIFEST)
        self.requests: list[httpx.Request] = []
        self.token_requests: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = request.url
        if url.host == "auth.test":
            self.token_requests.append(request)
            if request.headers.get("authorization") != "Basic " + base64.b64encode(b"alice:pw").decode():
                return httpx.Response(401)
            return httpx.Response(200, json={"token": "tok-" + url.params["scope"]})
        if self.auth == "bearer" and request.headers.get("authorization") != f"Bearer tok-repository:{self.repo}:pull":
            return httpx.Response(
                401,
                headers={
                    "WWW-Authenticate": f'Bearer realm="https://auth.test/token",service="{HOST}",scope="repository:{self.repo}:pull"'
                },
            )
        if (
            self.auth == "basic"
            and request.headers.get("authorization") != "Basic " + base64.b64encode(b"alice:pw").decode()
        ):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})
        path = url.path
        prefix = f"/v2/{self.repo}/"
        if not path.startswith(prefix):
            return httpx.Response(404, json={"errors": [{"code": "NAME_UNKNOWN"}]})
        kind, _, ref = path[len(prefix) :].partition("/")
        if kind == "manifests":
            digest = self.top if ref == self.tag else ref
            if digest not in self.manifests:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            body, mt = self.manifests[digest]
            return httpx.Response(200, content=body, headers={"Content-Type": mt, "Docker-Content-Digest": digest})
        if kind == "blobs" and ref in self.blobs:
            return httpx.Response(200, content=self.blobs[ref])
        if kind == "tags":
            return httpx.Response(200, json={"name": self.repo, "tags": [self.tag]})
        return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})


def small_image():
    return BuiltImage([TarBuilder().file("hello", b"world" * 1000).bytes()], "gzip", {"Cmd": ["/hello"]}, "")


def client(store, fake, **kw):
    return RegistryClient(store, transport=httpx.MockTransport(fake.handler), **kw)


def leftovers(store: ImageStore):
    return sorted(p.name for p in store.blob_dir.iterdir()) + sorted(p.name for p in store.tmp_dir.iterdir())


async def test_pull_over_https_by_default_and_records_repository_digest(tmp_path):
    fake = FakeRegistry(small_image())
    store = ImageStore(tmp_path)
    async with client(store, fake) as c:
        rec = await c.pull(f"{HOST}/team/app:v1")
    assert {r.url.scheme for r in fake.requests} == {"https"}
    assert rec.names == [f"{HOST}/team/app:v1"]
    assert rec.repository_digests == [f"{HOST}/team/app@{fake.image.manifest_digest}"]
    assert rec.config.cmd == ["/hello"]
    assert store.get(f"{HOST}/team/app@{fake.image.manifest_digest}").id == rec.id


async def test_insecure_registry_uses_plain_http(tmp_path):
    fake = FakeRegistry(small_image())
    async with client(ImageStore(tmp_path), fake, insecure_registries={HOST}) as c:
        await c.pull(f"{HOST}/team/app:v1")
    assert {r.url.scheme for r in fake.requests} == {"http"}


async def test_bearer_token_flow_fetches_a_scoped_token_with_credentials(tmp_path):
    fake = FakeRegistry(small_image(), auth="bearer")
    async with client(ImageStore(tmp_path), fake, credentials={HOST: ("alice", "pw")}) as c:
        await c.pull(f"{HOST}/team/app:v1")
    [tok] = fake.token_requests  # one token, reused for every later request
    assert tok.url.params["service"] == HOST
    assert tok.url.params["scope"] == "repository:team/app:pull"


async def test_bearer_without_credentials_is_unauthorized_and_leaves_nothing(tmp_path):
    fake = FakeRegistry(small_image(), auth="bearer")
    store = ImageStore(tmp_path)
    async with client(store, fake) as c:
        with pytest.raises(RegistryUnauthorized):
            await c.pull(f"{HOST}/team/app:v1")
    assert leftovers(store) == []


async def test_basic_auth_challenge_uses_configured_credentials(tmp_path):
    fake = FakeRegistry(small_image(), auth="basic")
    async with client(ImageStore(tmp_path), fake, credentials={HOST: ("alice", "pw")}) as c:
        await c.pull(f"{HOST}/team/app:v1")
    async with client(ImageStore(tmp_path / "2"), fake) as c:
        with pytest.raises(RegistryUnauthorized, match="no credentials"):
            await c.pull(f"{HOST}/team/app:v1")


async def test_index_resolves_to_the_host_platform(tmp_path):
    fake = FakeRegistry(small_image(), index=True)
    async with client(ImageStore(tmp_path), fake) as c:
        rec = await c.pull(f"{HOST}/team/app:v1")
    assert rec.manifest_digest == fake.image.manifest_digest
    assert rec.repository_digests == [f"{HOST}/team/app@{fake.top}"]  # the digest people pull by


async def test_pull_by_digest_verifies_the_manifest_bytes(tmp_path):
    fake = FakeRegistry(small_image())
    wrong = "sha256:" + "ab" * 32
    fake.manifests[wrong] = fake.manifests[fake.image.manifest_digest]
    store = ImageStore(tmp_path)
    async with client(store, fake) as c:
        with pytest.raises(DigestMismatch, match="manifest"):
            await c.pull(f"{HOST}/team/app@{wrong}")
        rec = await c.pull(f"{HOST}/team/app@{fake.image.manifest_digest}")
    assert rec.names == []  # a digest reference names no tag


async def test_corrupted_layer_from_registry_is_refused_and_rolled_back(tmp_path):
    img = BuiltImage(
        [TarBuilder().file("a", b"1" * 4000).bytes(), TarBuilder().file("b", b"2" * 4000).bytes()], "gzip", {}, ""
    )
    fake = FakeRegistry(img)
    bad = oci.sha256_digest(img.compressed[1])
    fake.blobs[bad] = fake.blobs[bad][:-1] + bytes([fake.blobs[bad][-1] ^ 1])
    store = ImageStore(tmp_path)
    async with client(store, fake) as c:
        with pytest.raises(DigestMismatch, match="digest mismatch"):
            await c.pull(f"{HOST}/team/app:v1")
    assert leftovers(store) == []
    assert store.list() == []


async def test_truncated_or_oversized_layer_is_a_digest_mismatch(tmp_path):
    img = small_image()
    fake = FakeRegistry(img)
    d = oci.sha256_digest(img.compressed[0])
    fake.blobs[d] = fake.blobs[d] + b"extra"
    store = ImageStore(tmp_path)
    async with client(store, fake) as c:
        with pytest.raises(DigestMismatch, match="longer"):
            await c.pull(f"{HOST}/team/app:v1")
    assert leftovers(store) == []


async def test_missing_repository_tag_and_server_errors_map_to_typed_errors(tmp_path):
    fake = FakeRegistry(small_image())
    async with client(ImageStore(tmp_path), fake) as c:
        with pytest.raises(RepositoryNotFound):
            await c.pull(f"{HOST}/team/nothing:v1")
        with pytest.raises(ManifestNotFound):
            await c.pull(f"{HOST}/team/app:v2")

    def failing(request):
        return httpx.Response(503)

    async with RegistryClient(ImageStore(tmp_path / "b"), transport=httpx.MockTransport(failing)) as c:
        with pytest.raises(RegistryUnavailable, match="503"):
            await c.pull(f"{HOST}/team/app:v1")

    def refused(request):
        raise httpx.ConnectError("connection refused", request=request)

    async with RegistryClient(ImageStore(tmp_path / "c"), transport=httpx.MockTransport(refused)) as c:
        with pytest.raises(RegistryUnavailable, match="unreachable"):
            await c.pull(f"{HOST}/team/app:v1")


async def test_plain_http_token_realm_is_refused_for_a_secure_registry(tmp_path):
    def handler(request):
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="http://auth.test/token"'})

    async with RegistryClient(ImageStore(tmp_path), transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(RegistryError, match="plain-HTTP token realm"):
            await c.pull(f"{HOST}/team/app:v1")


async def test_schema1_manifests_are_refused(tmp_path):
    def handler(request):
        return httpx.Response(
            200, content=b"{}", headers={"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}
        )

    async with RegistryClient(ImageStore(tmp_path), transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(InvalidImage, match="schema 1"):
            await c.pull(f"{HOST}/team/app:v1")


async def test_layers_already_in_the_store_are_not_downloaded_again(tmp_path):
    fake = FakeRegistry(small_image())
    store = ImageStore(tmp_path)
    async with client(store, fake) as c:
        await c.pull(f"{HOST}/team/app:v1")
        fake.requests.clear()
        await c.pull(f"{HOST}/team/app:v1")
    layer = oci.sha256_digest(fake.image.compressed[0])
    assert not any(r.url.path.endswith(layer) for r in fake.requests)


async def test_a_registry_that_trickles_a_layer_hits_the_transfer_deadline(tmp_path):
    import trio

    img = small_image()
    fake = FakeRegistry(img)
    layer = oci.sha256_digest(img.compressed[0])
    data = fake.blobs[layer]

    async def trickle():
        for i in range(len(data)):
            await trio.sleep(0.05)
            yield data[i : i + 1]

    def handler(request):
        if request.url.path.endswith(layer):
            return httpx.Response(200, content=trickle())
        return fake.handler(request)

    store = ImageStore(tmp_path)
    async with RegistryClient(
        store, transport=httpx.MockTransport(handler), timeout=0.3, min_transfer_rate=1_000_000
    ) as c:
        with trio.fail_after(10):  # the client's own deadline must fire well before this
            with pytest.raises(RegistryUnavailable, match="too slow"):
                await c.pull(f"{HOST}/team/app:v1")
    assert leftovers(store) == []


async def test_descriptors_claiming_huge_sizes_are_refused_before_download(tmp_path):
    img = small_image()
    fake = FakeRegistry(img)
    man = json.loads(img.manifest)
    man["layers"][0]["size"] = 10**15
    body = json.dumps(man).encode()
    fake.manifests = {oci.sha256_digest(body): (body, oci.OCI_MANIFEST)}
    fake.top = oci.sha256_digest(body)
    async with client(ImageStore(tmp_path), fake) as c:
        with pytest.raises(InvalidImage, match="claims"):
            await c.pull(f"{HOST}/team/app:v1")
    assert not any("/blobs/" in r.url.path for r in fake.requests)


async def test_a_successful_pull_stores_exactly_the_blobs_its_record_references(tmp_path):
    fake = FakeRegistry(small_image(), index=True)
    store = ImageStore(tmp_path)
    async with client(store, fake) as c:
        rec = await c.pull(f"{HOST}/team/app:v1")
    expected = {rec.manifest_digest, rec.config_digest, *(layer.digest for layer in rec.layers)}
    assert {f"sha256:{p.name}" for p in store.blob_dir.iterdir()} == expected
    assert list(store.tmp_dir.iterdir()) == []
    assert store.gc().removed_blobs == 0
