"""Pulls from a real registry: Debian's docker-registry (distribution 2.8) on
127.0.0.1, once without auth (insecure HTTP) and once behind Docker token auth
with a real token server issuing ES256-signed JWTs (x5c chain to the
registry's rootcertbundle)."""

import base64
import datetime
import json
import os
import secrets
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from cloudless.sandbox import oci
from cloudless.sandbox.imagebuild import BuiltImage, TarBuilder, busybox_image
from cloudless.sandbox.images import ImageStore
from cloudless.sandbox.oci import DigestMismatch
from cloudless.sandbox.registry import (
    ManifestNotFound,
    RegistryClient,
    RegistryUnauthorized,
    RegistryUnavailable,
    RepositoryNotFound,
    parse_www_authenticate,
)
from tests.harness.registry import DOCKER_REGISTRY, LocalRegistry, free_port, push_image

pytestmark = pytest.mark.skipif(not DOCKER_REGISTRY.exists(), reason="Debian docker-registry is not installed")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = LocalRegistry(tmp_path_factory.mktemp("registry")).start()
    push_image(busybox_image(), reg.url, "team/busybox", "1.0")
    yield reg
    reg.stop()


def assert_store_empty(store: ImageStore) -> None:
    assert list(store.blob_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []
    assert [p for p in store.layer_dir.iterdir()] == []
    assert store.list() == []


async def test_pull_busybox_from_local_registry(registry, tmp_path):
    store = ImageStore(tmp_path / "store")
    events = []
    async with RegistryClient(store, insecure_registries={registry.host}) as c:
        rec = await c.pull(f"{registry.host}/team/busybox:1.0", progress=events.append)
    img = busybox_image()
    assert rec.id == img.config_digest
    assert rec.manifest_digest == img.manifest_digest
    assert rec.names == [f"{registry.host}/team/busybox:1.0"]
    assert store.blob_path(rec.layers[0].digest).read_bytes() == img.compressed[0]
    downloads = [e for e in events if e.phase == "download"]
    assert downloads and downloads[-1].done == downloads[-1].total == len(img.compressed[0])
    if store.unpack_layers:
        assert (store.layer_path(rec.diff_ids[0]) / "bin/busybox").is_file()


async def test_missing_tag_repository_and_registry_are_clear_errors_leaving_nothing(registry, tmp_path):
    store = ImageStore(tmp_path / "store")
    async with RegistryClient(store, insecure_registries={registry.host, f"127.0.0.1:{free_port()}"}, timeout=5) as c:
        with pytest.raises(ManifestNotFound, match=r"no manifest 9\.9"):
            await c.pull(f"{registry.host}/team/busybox:9.9")
        with pytest.raises(RepositoryNotFound, match="does not exist"):
            await c.pull(f"{registry.host}/team/absent:1.0")
        closed = next(h for h in c.insecure if h != registry.host)
        with pytest.raises(RegistryUnavailable, match="unreachable"):
            await c.pull(f"{closed}/team/busybox:1.0")
    assert_store_empty(store)


async def test_https_is_the_default_so_a_plain_http_registry_is_not_used(registry, tmp_path):
    store = ImageStore(tmp_path / "store")
    async with RegistryClient(store, timeout=5) as c:
        with pytest.raises(RegistryUnavailable):
            await c.pull(f"{registry.host}/team/busybox:1.0")
    assert_store_empty(store)


async def test_layer_corrupted_in_registry_storage_is_refused(registry, tmp_path):
    img = BuiltImage([TarBuilder().file("payload", secrets.token_bytes(64 * 1024)).bytes()], "gzip", {}, "")
    push_image(img, registry.url, "team/corrupt", "1")
    hexd = oci.sha256_digest(img.compressed[0]).split(":")[1]
    data = registry.workdir / "storage/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    store = ImageStore(tmp_path / "store")
    async with RegistryClient(store, insecure_registries={registry.host}) as c:
        with pytest.raises(DigestMismatch, match="digest mismatch"):
            await c.pull(f"{registry.host}/team/corrupt:1")
    assert_store_empty(store)


def test_cli_pull_ls_rm_against_the_registry(registry, tmp_path, cloudless_bin):
    env = {**os.environ, "CLOUDLESS_DATA_DIR": str(tmp_path / "node")}
    ref = f"{registry.host}/team/busybox:1.0"
    pulled = subprocess.run(
        [cloudless_bin, "image", "pull", ref, "--insecure-registry", registry.host, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert pulled.returncode == 0, pulled.stderr
    doc = json.loads(pulled.stdout)
    assert doc["image"]["names"] == [ref]
    listed = json.loads(
        subprocess.run([cloudless_bin, "image", "ls", "--json"], capture_output=True, text=True, env=env).stdout
    )
    assert [i["names"] for i in listed["items"]] == [[ref]]
    missing = subprocess.run(
        [
            cloudless_bin,
            "image",
            "pull",
            f"{registry.host}/team/busybox:nope",
            "--insecure-registry",
            registry.host,
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert missing.returncode == 3 and json.loads(missing.stdout)["error"] == "not_found"
    bad = subprocess.run([cloudless_bin, "image", "pull", "UPPER/Case"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "lowercase" in bad.stderr
    removed = subprocess.run([cloudless_bin, "image", "rm", ref, "--json"], capture_output=True, text=True, env=env)
    assert removed.returncode == 0 and json.loads(removed.stdout)["freed_bytes"] > 0
    assert list((tmp_path / "node/images/blobs/sha256").iterdir()) == []


# -- token auth ----------------------------------------------------------------

ISSUER = "cloudless-test-issuer"
SERVICE = "cloudless-test-registry"
USERS = {"alice": "s3cret"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenAuthority:
    """A CA (trusted by the registry) and a leaf key that signs registry tokens."""

    def __init__(self, workdir):
        now = datetime.datetime.now(datetime.UTC)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cloudless test token CA")])
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token signer")]))
            .issuer_name(ca_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.ca_key, hashes.SHA256())
        )
        self.bundle = workdir / "token-ca.pem"
        self.bundle.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))

    def token(self, subject: str, access: list[dict]) -> str:
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self.leaf.public_bytes(serialization.Encoding.DER)).decode()],
        }
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def token_server(authority: TokenAuthority):
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            url = urlparse(self.path)
            q = parse_qs(url.query)
            requests.append(q)
            auth = self.headers.get("Authorization", "")
            user = None
            if auth.startswith("Basic "):
                name, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                if USERS.get(name) == pw:
                    user = name
            if user is None or q.get("service") != [SERVICE]:
                self.send_response(401)
                self.end_headers()
                return
            access = []
            for scope in q.get("scope", []):
                kind, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
            body = json.dumps({"token": authority.token(user, access), "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, requests


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    work = tmp_path_factory.mktemp("token-registry")
    authority = TokenAuthority(work)
    server, requests = token_server(authority)
    realm = f"http://127.0.0.1:{server.server_address[1]}/token"
    reg = LocalRegistry(
        work / "registry",
        auth={"token": {"realm": realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": str(authority.bundle)}},
    ).start()

    def token_for(response: httpx.Response) -> str:
        [ch] = parse_www_authenticate(response.headers["www-authenticate"])
        r = httpx.get(
            ch.params["realm"],
            params={"service": ch.params["service"], "scope": ch.params["scope"]},
            auth=("alice", "s3cret"),
        )
        r.raise_for_status()
        return r.json()["token"]

    push_image(busybox_image(), reg.url, "private/busybox", "1.0", token_source=token_for)
    yield reg, requests
    reg.stop()
    server.shutdown()
    server.server_close()


async def test_token_auth_pull_with_credentials(token_registry, tmp_path):
    reg, requests = token_registry
    requests.clear()
    store = ImageStore(tmp_path / "store")
    async with RegistryClient(store, insecure_registries={reg.host}, credentials={reg.host: ("alice", "s3cret")}) as c:
        rec = await c.pull(f"{reg.host}/private/busybox:1.0")
    assert rec.id == busybox_image().config_digest
    assert requests and requests[0]["scope"] == ["repository:private/busybox:pull"]


async def test_token_auth_refuses_anonymous_and_wrong_password_leaving_nothing(token_registry, tmp_path):
    reg, _ = token_registry
    for creds in ({}, {reg.host: ("alice", "wrong")}):
        store = ImageStore(tmp_path / f"store{len(creds)}")
        async with RegistryClient(store, insecure_registries={reg.host}, credentials=creds) as c:
            with pytest.raises(RegistryUnauthorized):
                await c.pull(f"{reg.host}/private/busybox:1.0")
        assert_store_empty(store)
