"""AWS Signature Version 4 verification, header and presigned-query forms.

Pure: the request's parts and `now` in, the verified `SignedRequest` (or an
`S3Error`) out. Reference: AWS "Signature Version 4 signing process" and the
S3 API's "Authenticating Requests (AWS Signature Version 4)" pages: canonical
request → string to sign → HMAC chain over date, region, service.

The region in the credential scope is accepted as the client states it: a
Cloudless cluster is one region, and tools default to us-east-1.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote

from cloudless.blobs.s3.errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_SKEW_SECONDS = 15 * 60
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600

_CREDENTIAL = re.compile(r"([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request")
_AMZ_DATE = "%Y%m%dT%H%M%SZ"


SecretLookup = Callable[[str], str]


@dataclass(frozen=True)
class SignedRequest:
    access_key: str
    amz_date: str
    scope: str  # date/region/service/aws4_request
    signature: str
    signing_key: bytes
    payload_hash: str  # the declared x-amz-content-sha256 (or UNSIGNED-PAYLOAD)
    presigned: bool


@dataclass(frozen=True)
class AuthHeader:
    access_key: str
    date: str
    region: str
    service: str
    signed_headers: list[str]
    signature: str


def uri_encode(value: str, encode_slash: bool = True) -> str:
    return quote(value, safe="-_.~" if encode_slash else "-_.~/")


def canonical_uri(raw_path: str) -> str:
    """S3 signs the path encoded once, per RFC 3986 unreserved characters; decode what the
    client sent and re-encode so clients that encode differently still match."""
    return uri_encode(unquote(raw_path), encode_slash=False) or "/"


def canonical_query(params: Sequence[tuple[str, str]], exclude: str | None = None) -> str:
    pairs = sorted((uri_encode(k), uri_encode(v)) for k, v in params if k != exclude)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _trim(value: str) -> str:
    return " ".join(value.strip().split())


def canonical_request(
    method: str,
    raw_path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    signed_headers: Sequence[str],
    payload_hash: str,
    exclude_query: str | None = None,
) -> str:
    lines = [method, canonical_uri(raw_path), canonical_query(query, exclude_query)]
    for name in signed_headers:
        if name not in headers:
            raise S3Error("AccessDenied", f"There were headers present in the request which were not signed: {name}")
        lines.append(f"{name}:{_trim(headers[name])}")
    lines.append("")
    lines.append(";".join(signed_headers))
    lines.append(payload_hash)
    return "\n".join(lines)


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = hmac.new(("AWS4" + secret).encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])


def sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def parse_authorization(value: str) -> AuthHeader:
    if not value.startswith(ALGORITHM + " "):
        raise S3Error("InvalidArgument", "Unsupported Authorization Type")
    fields: dict[str, str] = {}
    for part in value[len(ALGORITHM) + 1 :].split(","):
        name, sep, v = part.strip().partition("=")
        if not sep:
            raise S3Error("AuthorizationHeaderMalformed", f"The authorization header is malformed; {part.strip()!r}")
        fields[name] = v
    try:
        credential, signed, signature = fields["Credential"], fields["SignedHeaders"], fields["Signature"]
    except KeyError as exc:
        raise S3Error("AuthorizationHeaderMalformed", f"The authorization header is missing {exc.args[0]}") from None
    match = _CREDENTIAL.fullmatch(credential)
    if not match:
        raise S3Error(
            "AuthorizationHeaderMalformed", f"The authorization header is malformed; credential {credential!r}"
        )
    access_key, date, region, service = match.groups()
    return AuthHeader(access_key, date, region, service, signed.split(";"), signature)


def access_key_of(headers: Mapping[str, str], query: Sequence[tuple[str, str]]) -> str | None:
    """The access key a request claims (None when unsigned), so its secret can be fetched before `verify`."""
    if "authorization" in headers:
        return parse_authorization(headers["authorization"]).access_key
    for k, v in query:
        if k == "X-Amz-Credential":
            match = _CREDENTIAL.fullmatch(v)
            return match.group(1) if match else None
    return None


def parse_amz_date(value: str) -> float:
    try:
        return datetime.strptime(value, _AMZ_DATE).replace(tzinfo=UTC).timestamp()
    except (ValueError, TypeError):
        raise S3Error("AccessDenied", f"X-Amz-Date {str(value)[:40]!r} is not in ISO 8601 basic format") from None


def _check_signed_headers(signed: Sequence[str]) -> None:
    if "host" not in signed:
        raise S3Error("AccessDenied", "the host header must be signed")
    if list(signed) != sorted(signed):
        raise S3Error("AuthorizationHeaderMalformed", "SignedHeaders must be sorted")


def verify(
    *,
    method: str,
    raw_path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    secret_for: SecretLookup,
    now: float,
) -> SignedRequest:
    """Verify a request's SigV4 signature. `headers` are lower-cased names; `secret_for(access_key)`
    returns the secret or raises S3Error("InvalidAccessKeyId")."""
    params = dict(query)
    if "authorization" in headers:
        auth = parse_authorization(headers["authorization"])
        amz_date = headers.get("x-amz-date") or ""
        if not amz_date:
            raise S3Error("AccessDenied", "AWS authentication requires a valid Date or x-amz-date header")
        when = parse_amz_date(amz_date)
        if abs(now - when) > MAX_SKEW_SECONDS:
            err = S3Error("RequestTimeTooSkewed")
            err.fields.update(RequestTime=amz_date, ServerTime=_iso(now), MaxAllowedSkewMilliseconds="900000")
            raise err
        payload_hash = headers.get("x-amz-content-sha256", "")
        if not payload_hash:
            raise S3Error("InvalidRequest", "Missing required header for this request: x-amz-content-sha256")
        if not (_is_hex_sha256(payload_hash) or payload_hash in _PAYLOAD_MODES):
            raise S3Error(
                "InvalidArgument", "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, a streaming mode or a SHA-256"
            )
        _check_signed_headers(auth.signed_headers)
        presigned = False
        exclude = None
    elif "X-Amz-Signature" in params or "X-Amz-Algorithm" in params:
        if params.get("X-Amz-Algorithm") != ALGORITHM:
            raise S3Error("AuthorizationQueryParametersError", "X-Amz-Algorithm must be AWS4-HMAC-SHA256")
        try:
            credential = params["X-Amz-Credential"]
            amz_date = params["X-Amz-Date"]
            expires = int(params["X-Amz-Expires"])
            signed = params["X-Amz-SignedHeaders"].split(";")
            signature = params["X-Amz-Signature"]
        except (KeyError, ValueError) as exc:
            raise S3Error("AccessDenied", f"Query-string authentication requires {exc}") from None
        match = _CREDENTIAL.fullmatch(credential)
        if not match:
            raise S3Error("AuthorizationQueryParametersError", "X-Amz-Credential is malformed")
        access_key, date, region, service = match.groups()
        auth = AuthHeader(access_key, date, region, service, signed, signature)
        when = parse_amz_date(amz_date)
        if not 1 <= expires <= MAX_PRESIGN_EXPIRES:
            raise S3Error(
                "AuthorizationQueryParametersError",
                "X-Amz-Expires must be between 1 and 604800 seconds",
            )
        if now > when + expires:
            raise S3Error("AccessDenied", "Request has expired")
        if when - now > MAX_SKEW_SECONDS:
            raise S3Error("AccessDenied", "Request is not yet valid")
        _check_signed_headers(signed)
        payload_hash = params.get("X-Amz-Content-Sha256", UNSIGNED_PAYLOAD)
        presigned = True
        exclude = "X-Amz-Signature"
    else:
        raise S3Error("AccessDenied")

    if auth.date != amz_date[:8]:
        raise S3Error("SignatureDoesNotMatch", "the credential scope date does not match X-Amz-Date")
    if auth.service != "s3":
        raise S3Error("SignatureDoesNotMatch", f"the credential scope names service {auth.service!r}, not s3")
    secret = secret_for(auth.access_key)
    key = signing_key(secret, auth.date, auth.region, auth.service)
    scope = f"{auth.date}/{auth.region}/{auth.service}/aws4_request"
    canonical = canonical_request(method, raw_path, query, headers, auth.signed_headers, payload_hash, exclude)
    expected = sign(key, string_to_sign(amz_date, scope, canonical))
    if not hmac.compare_digest(expected, auth.signature):
        err = S3Error("SignatureDoesNotMatch")
        err.fields.update(AWSAccessKeyId=auth.access_key, CanonicalRequest=canonical)
        raise err
    return SignedRequest(auth.access_key, amz_date, scope, auth.signature, key, payload_hash, presigned)


def chunk_signature(request: SignedRequest, previous: str, chunk_sha256: str) -> str:
    """Signature of one aws-chunked chunk (STREAMING-AWS4-HMAC-SHA256-PAYLOAD)."""
    text = "\n".join(
        ["AWS4-HMAC-SHA256-PAYLOAD", request.amz_date, request.scope, previous, EMPTY_SHA256, chunk_sha256]
    )
    return sign(request.signing_key, text)


def trailer_signature(request: SignedRequest, previous: str, trailer_text: str) -> str:
    text = "\n".join(
        [
            "AWS4-HMAC-SHA256-TRAILER",
            request.amz_date,
            request.scope,
            previous,
            hashlib.sha256(trailer_text.encode()).hexdigest(),
        ]
    )
    return sign(request.signing_key, text)


_PAYLOAD_MODES = {
    UNSIGNED_PAYLOAD,
    STREAMING_SIGNED,
    STREAMING_UNSIGNED_TRAILER,
    STREAMING_SIGNED_TRAILER,
}


def _is_hex_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def presign_url(
    *,
    method: str,
    host: str,
    path: str,
    access_key: str,
    secret: str,
    now: float,
    expires: int = 3600,
    region: str = "us-east-1",
    scheme: str = "https",
) -> str:
    """A presigned URL (for tests and `cloudless blob` share links)."""
    amz_date = datetime.fromtimestamp(now, UTC).strftime(_AMZ_DATE)
    date = amz_date[:8]
    scope = f"{date}/{region}/s3/aws4_request"
    query = [
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{access_key}/{scope}"),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    canonical = canonical_request(method, path, query, {"host": host}, ["host"], UNSIGNED_PAYLOAD)
    signature = sign(signing_key(secret, date, region, "s3"), string_to_sign(amz_date, scope, canonical))
    return f"{scheme}://{host}{canonical_uri(path)}?{canonical_query(query)}&X-Amz-Signature={signature}"
