"""A real S3 endpoint for tests: moto's standalone server on 127.0.0.1 and a free port, with authentication on.

The server is a separate process (a real HTTP endpoint; no client library is mocked). It checks credentials
after its first few unauthenticated calls (``INITIAL_NO_AUTH_ACTION_COUNT``), which create an IAM user with an
access key; from then on a wrong key or secret is refused as real S3 refuses it (403), so the tests of bad
credentials mean something. Stopped by its pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# The standard variables the server is announced by (S3Server.env), which the test session sets for Ray's workers.
S3_TEST_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
)
# The calls allowed without credentials: create the user, its key and its policy.
_SETUP_CALLS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """A running moto server: its endpoint, a valid key pair and region, and the process."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen
    log: Path
    buckets: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point every client (pyarrow, boto3, Ray) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):  # noqa: ANN201 - a boto3 S3 client (boto3 has no importable type here)
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` in ``bucket`` (sorted)."""
        paginator = self.client().get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return sorted(keys)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_s3_server(workdir: Path, *, region: str = "us-east-1") -> S3Server:
    """Start moto's server with authentication, create an IAM user with full access, return its credentials."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = workdir / "moto.log"
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(_SETUP_CALLS))
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            # The dashboard answers without credentials and does not count as an action.
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}; see {log}") from None
            time.sleep(0.2)
    iam = boto3.client(
        "iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup", region_name=region
    )
    iam.create_user(UserName="orchestrator-tests")
    key = iam.create_access_key(UserName="orchestrator-tests")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="orchestrator-tests", PolicyName="all", PolicyDocument=json.dumps(policy))
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], region, process, log)
