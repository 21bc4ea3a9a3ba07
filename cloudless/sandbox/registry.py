"""Pulls images from OCI distribution (v2) registries into the `ImageStore`.

    async with RegistryClient(store, insecure_registries={"127.0.0.1:5000"}) as client:
        record = await client.pull("127.0.0.1:5000/team/app:1.0", progress=callback)

HTTPS by default; plain HTTP only for registries named in
`insecure_registries`. Auth follows the registry's 401 challenge
(WWW-Authenticate, RFC 7235): `Bearer realm=…,service=…,scope=…` fetches a
token from the realm (with basic credentials if we have some for the
registry, anonymously otherwise), `Basic` sends the credentials directly.

Every request has a timeout (httpx connect/read/write/pool). The manifest is
checked against the requested digest (or the registry's
Docker-Content-Digest), an index is resolved to linux/<host arch>, and each
blob is hashed while it streams to disk and refused on mismatch. Failures
raise typed errors (`RegistryUnavailable`, `RepositoryNotFound`,
`ManifestNotFound`, `RegistryUnauthorized`, `DigestMismatch`) and roll back
every blob the pull wrote.
"""

from __future__ import annotations

import base64
import logging
import re
import ssl
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import msgspec
import trio

from cloudless.errors import CloudlessError, NotFound, Unavailable
from cloudless.sandbox import oci
from cloudless.sandbox.images import ImageRecord, ImageStore, ProgressCallback, ProgressEvent, _Ingest
from cloudless.sandbox.oci import DigestMismatch, InvalidImage
from cloudless.sandbox.reference import Reference, parse_reference

log = logging.getLogger(__name__)

MANIFEST_ACCEPT = ", ".join([oci.OCI_INDEX, oci.OCI_MANIFEST, oci.DOCKER_MANIFEST_LIST, oci.DOCKER_MANIFEST])
_MAX_TOKEN_RESPONSE = 1024 * 1024


class RegistryError(CloudlessError):
    """The registry answered, but not with what we asked for."""


class RegistryUnavailable(Unavailable):
    """The registry could not be reached, timed out or is failing (5xx, 429)."""


class RegistryUnauthorized(RegistryError):
    code = "unauthorized"


class RepositoryNotFound(NotFound):
    pass


class ManifestNotFound(NotFound):
    """The repository exists but has no such tag or digest."""


class BlobNotFound(NotFound):
    pass


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lowercased: "bearer", "basic"
    params: dict[str, str]


_AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)')


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse the challenges of a WWW-Authenticate header (RFC 7235 §4.1)."""
    out: list[Challenge] = []
    rest = header.strip()
    while rest:
        m = re.match(r"([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)\s*", rest)
        if not m:
            raise RegistryError(f"malformed WWW-Authenticate header {header!r}")
        scheme = m.group(1).lower()
        rest = rest[m.end() :]
        params: dict[str, str] = {}
        while rest:
            pm = _AUTH_PARAM.match(rest)
            if not pm:
                break
            value = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            rest = rest[pm.end() :]
        out.append(Challenge(scheme, params))
        rest = rest.lstrip(", ")
    return out


class _TokenResponse(msgspec.Struct):
    token: str = ""
    access_token: str = ""


class _ErrorBody(msgspec.Struct):
    errors: list[dict] = []


class RegistryClient:
    def __init__(
        self,
        store: ImageStore,
        *,
        insecure_registries: Iterable[str] = (),
        credentials: Mapping[str, tuple[str, str]] | None = None,
        timeout: float = 30.0,
        max_parallel_layers: int = 3,
        min_transfer_rate: int = 64 * 1024,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | str | bool = True,
    ) -> None:
        """`credentials` maps a registry host (as in references) to (user, password);
        `verify` is passed to httpx (True, an ssl.SSLContext or a CA bundle path).
        `timeout` bounds each request step; besides, a whole transfer must finish
        within timeout + size / `min_transfer_rate` seconds, so a registry that
        trickles bytes cannot hold a pull forever."""
        self.store = store
        self.insecure = frozenset(insecure_registries)
        self.credentials = dict(credentials or {})
        self.timeout = httpx.Timeout(timeout, connect=min(10.0, timeout))
        self._timeout_s = timeout
        self._min_rate = max(1, min_transfer_rate)
        self._layer_limit = trio.CapacityLimiter(max_parallel_layers)
        self._http = httpx.AsyncClient(
            timeout=self.timeout,
            follow_redirects=True,
            transport=transport,
            verify=verify,
            headers={"User-Agent": "cloudless"},
        )
        self._auth: dict[str, str] = {}  # registry -> Authorization header value

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- public ------------------------------------------------------------

    async def pull(self, reference: str | Reference, progress: ProgressCallback | None = None) -> ImageRecord:
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        log.info("registry.pull_start", extra={"reference": str(ref)})
        with self.store.ingest() as txn:
            with self._deadline(ref, "the manifest", oci.MAX_DOCUMENT_BYTES):
                top_digest, data, media_type = await self._manifest(ref, ref.manifest_ref)
            kind = oci.document_kind(data, media_type)
            if kind == "index":
                desc = oci.select_platform(oci.decode_index(data), self.store.platform)
                with self._deadline(ref, "the manifest", oci.MAX_DOCUMENT_BYTES):
                    _, data, media_type = await self._manifest(ref, desc.digest, desc.size)
                if oci.document_kind(data, media_type) != "manifest":
                    raise InvalidImage("image index points at another index", digest=desc.digest)
            manifest = oci.decode_manifest(data)
            self._check_sizes(manifest)
            with self._deadline(ref, "the image config", manifest.config.size):
                config = await self._small_blob(ref, manifest.config)
            self.store.put_blob(txn, config, manifest.config.digest)
            try:
                async with trio.open_nursery() as nursery:
                    for layer in manifest.layers:
                        nursery.start_soon(self._layer, ref, layer, txn, progress)
            except BaseExceptionGroup as group:
                raise _first_failure(group) from None
            names = [ref.tagged] if ref.tagged else []
            record = await trio.to_thread.run_sync(
                lambda: self.store.install(
                    txn, data, names, repository_digests=[f"{ref.name}@{top_digest}"], progress=progress
                )
            )
        log.info("registry.pull_done", extra={"reference": str(ref), "image": record.id})
        return record

    def _check_sizes(self, manifest: oci.Manifest) -> None:
        if manifest.config.size > oci.MAX_DOCUMENT_BYTES:
            raise InvalidImage(f"image config claims {manifest.config.size} bytes, over the document limit")
        for layer in manifest.layers:
            if layer.size > self.store.limits.max_layer_bytes:
                raise InvalidImage(
                    f"layer {layer.digest} claims {layer.size} bytes, over the {self.store.limits.max_layer_bytes} limit"
                )

    @contextmanager
    def _deadline(self, ref: Reference, what: str, size: int) -> Iterator[None]:
        try:
            with trio.fail_after(self._timeout_s + size / self._min_rate):
                yield
        except trio.TooSlowError:
            raise RegistryUnavailable(
                f"registry {ref.registry} was too slow sending {what} (under {self._min_rate} bytes/s)",
                registry=ref.registry,
            ) from None

    # -- HTTP --------------------------------------------------------------

    def _base(self, ref: Reference) -> str:
        scheme = "http" if ref.registry in self.insecure or ref.api_host in self.insecure else "https"
        return f"{scheme}://{ref.api_host}"

    async def _send(self, ref: Reference, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
        """Send with auth, following one 401 challenge; the response is streaming."""
        for attempt in range(2):
            h = dict(headers)
            if ref.registry in self._auth:
                h["Authorization"] = self._auth[ref.registry]
            try:
                response = await self._http.send(self._http.build_request(method, url, headers=h), stream=True)
            except httpx.TimeoutException as exc:
                raise RegistryUnavailable(
                    f"registry {ref.registry} timed out: {exc!r}", registry=ref.registry
                ) from None
            except httpx.TransportError as exc:
                raise RegistryUnavailable(
                    f"registry {ref.registry} is unreachable: {exc}", registry=ref.registry
                ) from None
            if response.status_code != 401:
                return response
            challenge_header = response.headers.get("www-authenticate", "")
            await response.aclose()
            if attempt == 1:
                break
            await self._authenticate(ref, challenge_header)
        # Registries answer 401 for repositories that do not exist too (Docker Hub does).
        raise RegistryUnauthorized(
            f"registry {ref.registry} refused access to {ref.repository}: it may not exist, or needs "
            + ("other credentials" if ref.registry in self.credentials else "credentials (none configured)"),
            registry=ref.registry,
        )

    async def _authenticate(self, ref: Reference, header: str) -> None:
        challenges = parse_www_authenticate(header) if header else []
        creds = self.credentials.get(ref.registry)
        for ch in challenges:
            if ch.scheme == "bearer":
                self._auth[ref.registry] = f"Bearer {await self._token(ref, ch, creds)}"
                return
        for ch in challenges:
            if ch.scheme == "basic" and creds:
                self._auth[ref.registry] = _basic(creds)
                return
        raise RegistryUnauthorized(
            f"registry {ref.registry} requires authentication"
            + ("" if creds else " and no credentials are configured"),
            registry=ref.registry,
        )

    async def _token(self, ref: Reference, ch: Challenge, creds: tuple[str, str] | None) -> str:
        realm = ch.params.get("realm")
        if not realm or not realm.startswith(("https://", "http://")):
            raise RegistryError(f"registry {ref.registry} sent a bearer challenge without a usable realm")
        if realm.startswith("http://") and ref.registry not in self.insecure:
            raise RegistryError(f"refusing a plain-HTTP token realm {realm} for a secure registry")
        params = {}
        if "service" in ch.params:
            params["service"] = ch.params["service"]
        params["scope"] = ch.params.get("scope") or f"repository:{ref.repository}:pull"
        headers = {"Authorization": _basic(creds)} if creds else {}
        try:
            r = await self._http.get(realm, params=params, headers=headers)
        except httpx.TimeoutException as exc:
            raise RegistryUnavailable(f"token service {realm} timed out: {exc!r}") from None
        except httpx.TransportError as exc:
            raise RegistryUnavailable(f"token service {realm} is unreachable: {exc}") from None
        if r.status_code in (401, 403):
            raise RegistryUnauthorized(f"token service {realm} refused the credentials for {ref.registry}")
        if r.status_code != 200:
            raise RegistryError(f"token service {realm} answered HTTP {r.status_code}")
        if len(r.content) > _MAX_TOKEN_RESPONSE:
            raise RegistryError(f"token service {realm} sent an oversized response")
        try:
            body = msgspec.json.decode(r.content, type=_TokenResponse)
        except msgspec.MsgspecError:
            raise RegistryError(f"token service {realm} sent an invalid token response") from None
        token = body.token or body.access_token
        if not token:
            raise RegistryError(f"token service {realm} sent no token")
        return token

    async def _manifest(self, ref: Reference, what: str, size: int | None = None) -> tuple[str, bytes, str]:
        url = f"{self._base(ref)}/v2/{ref.repository}/manifests/{what}"
        response = await self._send(ref, "GET", url, {"Accept": MANIFEST_ACCEPT})
        try:
            if response.status_code == 404:
                code = await _error_code(response)
                if code != "NAME_UNKNOWN" and not await self._repository_exists(ref):
                    code = "NAME_UNKNOWN"
                if code == "NAME_UNKNOWN":
                    raise RepositoryNotFound(
                        f"repository {ref.repository} does not exist on {ref.registry}", reference=str(ref)
                    )
                raise ManifestNotFound(f"{ref.registry}/{ref.repository} has no manifest {what}", reference=str(ref))
            await _raise_for_status(response, ref, f"manifest {what}")
            data = await _read_capped(response, oci.MAX_DOCUMENT_BYTES, f"manifest {what}")
            media_type = response.headers.get("content-type", "")
            header_digest = response.headers.get("docker-content-digest", "")
        finally:
            await response.aclose()
        digest = oci.sha256_digest(data)
        expected = (
            what if what.startswith("sha256:") else (header_digest if header_digest.startswith("sha256:") else None)
        )
        if expected is not None and digest != expected:
            raise DigestMismatch(
                f"manifest from {ref.registry} hashes to {digest}, expected {expected}",
                expected=expected,
                actual=digest,
            )
        if size is not None and len(data) != size:
            raise DigestMismatch(f"manifest {what} is {len(data)} bytes, descriptor says {size}")
        return digest, data, media_type

    async def _repository_exists(self, ref: Reference) -> bool:
        """Tell a missing repository from a missing tag (some registries answer
        MANIFEST_UNKNOWN for both; the tag list says NAME_UNKNOWN)."""
        try:
            response = await self._send(ref, "GET", f"{self._base(ref)}/v2/{ref.repository}/tags/list?n=1", {})
        except CloudlessError:
            return True
        try:
            return not (response.status_code == 404 and await _error_code(response) == "NAME_UNKNOWN")
        finally:
            await response.aclose()

    def _blob_url(self, ref: Reference, digest: str) -> str:
        return f"{self._base(ref)}/v2/{ref.repository}/blobs/{digest}"

    async def _small_blob(self, ref: Reference, desc: oci.Descriptor) -> bytes:
        response = await self._send(ref, "GET", self._blob_url(ref, desc.digest), {})
        try:
            if response.status_code == 404:
                raise BlobNotFound(f"registry {ref.registry} has no blob {desc.digest}", digest=desc.digest)
            await _raise_for_status(response, ref, f"blob {desc.digest}")
            data = await _read_capped(response, max(desc.size, 0), f"blob {desc.digest}")
        finally:
            await response.aclose()
        oci.verify_bytes(data, desc.digest, f"blob {desc.digest}")
        return data

    async def _layer(
        self, ref: Reference, desc: oci.Descriptor, txn: _Ingest, progress: ProgressCallback | None
    ) -> None:
        if self.store.has_blob(desc.digest):
            if progress:
                progress(ProgressEvent("download", desc.digest, desc.size, desc.size))
            return
        async with self._layer_limit:
            with self._deadline(ref, f"layer {desc.digest}", desc.size):
                await self._download(ref, desc, txn, progress)

    async def _download(
        self, ref: Reference, desc: oci.Descriptor, txn: _Ingest, progress: ProgressCallback | None
    ) -> None:
        response = await self._send(ref, "GET", self._blob_url(ref, desc.digest), {})
        writer = self.store.writer(txn, desc.digest, desc.size)
        try:
            if response.status_code == 404:
                raise BlobNotFound(f"registry {ref.registry} has no blob {desc.digest}", digest=desc.digest)
            await _raise_for_status(response, ref, f"blob {desc.digest}")
            try:
                async for chunk in response.aiter_bytes(1024 * 1024):
                    writer.write(chunk)
                    if progress:
                        progress(ProgressEvent("download", desc.digest, writer.written, desc.size))
            except httpx.TimeoutException as exc:
                raise RegistryUnavailable(f"registry {ref.registry} timed out sending {desc.digest}: {exc!r}") from None
            except httpx.TransportError as exc:
                raise RegistryUnavailable(f"registry {ref.registry} broke off sending {desc.digest}: {exc}") from None
        except BaseException:
            writer.abort()
            raise
        finally:
            await response.aclose()
        await trio.to_thread.run_sync(self.store.commit_blob, txn, writer)


def _first_failure(group: BaseExceptionGroup) -> BaseException:
    """The error to report from parallel layer downloads (ours before anything else)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    for e in leaves:
        if isinstance(e, CloudlessError):
            return e
    for e in leaves:
        if not isinstance(e, trio.Cancelled):
            return e
    return group


def _basic(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


async def _read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    parts = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > limit:
            raise DigestMismatch(f"{what} is larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def _error_code(response: httpx.Response) -> str:
    try:
        body = msgspec.json.decode(await _read_capped(response, 64 * 1024, "error body"), type=_ErrorBody)
    except (msgspec.MsgspecError, DigestMismatch):
        return ""
    for err in body.errors:
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            return err["code"]
    return ""


async def _raise_for_status(response: httpx.Response, ref: Reference, what: str) -> None:
    status = response.status_code
    if status < 300:
        return
    if status == 429 or status >= 500:
        raise RegistryUnavailable(f"registry {ref.registry} answered HTTP {status} for {what}", registry=ref.registry)
    if status == 403:
        raise RegistryUnauthorized(f"registry {ref.registry} forbids {what}", registry=ref.registry)
    code = await _error_code(response)
    raise RegistryError(
        f"registry {ref.registry} answered HTTP {status}{' ' + code if code else ''} for {what}", registry=ref.registry
    )
