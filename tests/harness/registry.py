"""A local docker-registry for tests, and pushing built images to it."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from cloudless.sandbox import oci
from cloudless.sandbox.imagebuild import BuiltImage

# Pushing to a registry (distribution v2, monolithic uploads) ----------------


def push_image(
    image: BuiltImage,
    base_url: str,
    repository: str,
    tag: str,
    *,
    token_source: Callable[[httpx.Response], str] | None = None,
    timeout: float = 30.0,
) -> str:
    """Push `image` to `base_url` (e.g. "http://127.0.0.1:5000"); returns the manifest digest.

    `token_source(response_401)` returns a bearer token for registries that
    demand one.
    """
    headers: dict[str, str] = {}
    with httpx.Client(base_url=base_url, timeout=timeout) as client:

        def request(method: str, url: str, **kw) -> httpx.Response:
            extra = kw.pop("headers", {})
            r = client.request(method, url, headers={**headers, **extra}, **kw)
            if r.status_code == 401 and token_source is not None:
                headers["Authorization"] = f"Bearer {token_source(r)}"
                r = client.request(method, url, headers={**headers, **extra}, **kw)
            return r

        for digest, data in image.blobs().items():
            if digest == image.manifest_digest:
                continue
            if request("HEAD", f"/v2/{repository}/blobs/{digest}").status_code == 200:
                continue
            r = request("POST", f"/v2/{repository}/blobs/uploads/")
            r.raise_for_status()
            location = r.headers["Location"]
            sep = "&" if "?" in location else "?"
            r = request(
                "PUT",
                f"{location}{sep}digest={digest}",
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            r.raise_for_status()
        r = request(
            "PUT",
            f"/v2/{repository}/manifests/{tag}",
            content=image.manifest,
            headers={"Content-Type": oci.OCI_MANIFEST},
        )
        r.raise_for_status()
    return image.manifest_digest


# A real registry on loopback (Debian's docker-registry) ----------------------

DOCKER_REGISTRY = Path("/usr/bin/docker-registry")


def free_port() -> int:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRegistry:
    """A docker-registry process on 127.0.0.1 with filesystem storage in `workdir`.

    `auth` is inserted as the config's `auth:` section (e.g. a token section).
    """

    def __init__(self, workdir: Path, auth: dict | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.auth = auth
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> LocalRegistry:

        if not DOCKER_REGISTRY.exists():
            raise FileNotFoundError(f"{DOCKER_REGISTRY} is missing: install Debian's docker-registry")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(self.workdir / "storage")}, "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": "cloudless-test"},
        }
        if self.auth:
            config["auth"] = self.auth
        cfg = self.workdir / "config.yml"
        cfg.write_text(yaml.safe_dump(config))
        self._log = open(self.workdir / "registry.log", "wb")
        self.proc = subprocess.Popen([str(DOCKER_REGISTRY), "serve", str(cfg)], stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(self.workdir / 'registry.log').read_text()[-2000:]}")
            try:
                r = httpx.get(f"{self.url}/v2/", timeout=1.0)
                if r.status_code in (200, 401):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start listening in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
