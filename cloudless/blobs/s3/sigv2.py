"""AWS Signature Version 2 (legacy) for S3: header form `AWS key:sig` and the
query form boto3 still produces for presigned URLs by default
(`AWSAccessKeyId`, `Signature`, `Expires`). Reference: the S3 Developer Guide,
"Signing and authenticating REST requests". Pure, like `sigv4`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from urllib.parse import unquote

from cloudless.blobs.s3.errors import S3Error

# Sub-resources that are part of the string to sign.
_SUBRESOURCES = {
    "acl", "delete", "lifecycle", "location", "logging", "notification", "partNumber", "policy",
    "requestPayment", "torrent", "uploadId", "uploads", "versionId", "versioning", "versions", "website",
    "cors", "tagging", "restore", "replication", "encryption",
    "response-content-type", "response-content-language", "response-expires", "response-cache-control",
    "response-content-disposition", "response-content-encoding",
}  # fmt: skip
MAX_SKEW_SECONDS = 15 * 60


def is_sigv2(headers: Mapping[str, str], query: Sequence[tuple[str, str]]) -> bool:
    auth = headers.get("authorization", "")
    return auth.startswith("AWS ") or any(k == "AWSAccessKeyId" for k, _ in query)


def access_key_of(headers: Mapping[str, str], query: Sequence[tuple[str, str]]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.startswith("AWS "):
        return auth[4:].rpartition(":")[0].strip() or None
    return dict(query).get("AWSAccessKeyId")


def string_to_sign(
    method: str, raw_path: str, query: Sequence[tuple[str, str]], headers: Mapping[str, str], date: str
) -> str:
    amz = sorted((k, v.strip()) for k, v in headers.items() if k.startswith("x-amz-"))
    sub = sorted((k, v) for k, v in query if k in _SUBRESOURCES)
    resource = raw_path.split("?")[0]
    if sub:
        resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in sub)
    lines = [method, headers.get("content-md5", ""), headers.get("content-type", ""), date]
    lines.extend(f"{k}:{v}" for k, v in amz)
    return "\n".join(lines) + "\n" + resource if amz else "\n".join([*lines, resource])


def sign(secret: str, text: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), text.encode("utf-8"), hashlib.sha1).digest()).decode()


def verify(
    *,
    method: str,
    raw_path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    secret: str,
    now: float,
    parse_http_date,  # type: ignore[no-untyped-def]
) -> str:
    """Returns the access key on success."""
    params = dict(query)
    auth = headers.get("authorization", "")
    if auth.startswith("AWS "):
        access_key, _, signature = auth[4:].rpartition(":")
        date = "" if "x-amz-date" in headers else headers.get("date", "")
        when = parse_http_date(headers.get("x-amz-date") or headers.get("date") or "")
        if when is None:
            raise S3Error("AccessDenied", "AWS authentication requires a valid Date or x-amz-date header")
        if abs(now - when) > MAX_SKEW_SECONDS:
            raise S3Error("RequestTimeTooSkewed")
    else:
        access_key, signature, date = params["AWSAccessKeyId"], params.get("Signature", ""), params.get("Expires", "")
        try:
            expires = int(date)
        except ValueError:
            raise S3Error(
                "AccessDenied",
                "Query-string authentication requires the Signature, Expires and AWSAccessKeyId parameters",
            ) from None
        if now > expires:
            raise S3Error("AccessDenied", "Request has expired")
    query_wo_sig = [(k, v) for k, v in query if k not in ("Signature", "AWSAccessKeyId", "Expires")]
    expected = sign(secret, string_to_sign(method, raw_path, query_wo_sig, headers, date))
    if not hmac.compare_digest(expected, unquote(signature) if "%" in signature else signature):
        raise S3Error("SignatureDoesNotMatch")
    return access_key
