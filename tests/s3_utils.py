"""A real S3 HTTP endpoint on localhost for the object-store tests: moto's server mode (``python -m moto.server``)
in a process of its own, started once per test session (``s3_server`` in tests/conftest.py).

The code under test finds it as it would find a real object store: through the standard environment variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and the endpoint in S3_ENDPOINT_URL, which
streaming passes to boto3, and AWS_ENDPOINT_URL, which boto3 reads itself), set in this process's environment for
the rest of the session and so inherited by the processes the tests start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def client(self):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint)

    def new_bucket(self, stem: str = "test") -> str:
        """A fresh, empty bucket; its name."""
        name = f"{stem}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server(log_path: Path, timeout: float = 60.0) -> S3Server:
    """Start moto's server on a free localhost port and wait until it answers; sets the AWS variables."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, **ENV),
    )
    os.environ.update(ENV, S3_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL=endpoint)
    server = S3Server(endpoint, process)
    deadline = time.time() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            server.client().list_buckets()
            return server
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline:
                process.kill()
                raise RuntimeError(f"moto server did not answer on {endpoint} within {timeout:.0f} s") from None
            time.sleep(0.2)


def stop_s3_server(server: S3Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    for key in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", *ENV):
        os.environ.pop(key, None)
