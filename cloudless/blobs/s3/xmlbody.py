"""S3's XML: building responses and parsing the few request bodies (safely)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from datetime import UTC, datetime
from xml.sax.saxutils import escape

from cloudless.blobs.s3.errors import S3Error

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
DECL = '<?xml version="1.0" encoding="UTF-8"?>\n'
MAX_XML_BODY = 2 << 20


def iso8601(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + "000Z"


def el(name: str, value: object) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"<{name}>{escape(str(value))}</{name}>"


def document(root: str, parts: Iterable[str], namespaced: bool = True) -> bytes:
    ns = f' xmlns="{NS}"' if namespaced else ""
    return (DECL + f"<{root}{ns}>" + "".join(parts) + f"</{root}>").encode()


def error_document(code: str, message: str, request_id: str, resource: str, fields: dict[str, str]) -> bytes:
    parts = [el("Code", code), el("Message", message)]
    parts.extend(el(k, v) for k, v in fields.items())
    parts.extend([el("Resource", resource), el("RequestId", request_id), el("HostId", request_id)])
    return (DECL + "<Error>" + "".join(parts) + "</Error>").encode()


def parse(body: bytes) -> ET.Element:
    """Parse a request body, refusing DTDs (entity expansion) and oversized input."""
    if len(body) > MAX_XML_BODY or b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise S3Error("MalformedXML")
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise S3Error("MalformedXML") from None
    for node in root.iter():
        if isinstance(node.tag, str) and "}" in node.tag:
            node.tag = node.tag.split("}", 1)[1]
    return root
