"""A real S3-compatible server for the tests of bucket storage: moto's standalone server
on 127.0.0.1, in this process, with a bucket; and the environment that points a study's
processes at it (the standard AWS variables, as a user of MinIO sets them)."""

import logging
import os
from dataclasses import dataclass

import pytest

from .conftest import free_port

BUCKET = "studies"


@dataclass(frozen=True)
class S3:
    endpoint: str
    bucket: str

    def env(self, base=None) -> dict[str, str]:
        """`base` (this process's environment) pointed at the server, with its keys; no
        process asks a cloud's metadata endpoint for credentials."""
        return {
            **(os.environ if base is None else base),
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}".rstrip("/")


@pytest.fixture(scope="session")
def s3_server():
    """moto's server, up for the session, with one bucket."""
    pytest.importorskip("moto", reason="moto[server] is in the dev extra")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # One line a request otherwise.
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    )  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    try:
        yield S3(endpoint, BUCKET)
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process pointed at the server (for the library functions a test calls)."""
    for key, value in s3_server.env({}).items():
        monkeypatch.setenv(key, value)
    return s3_server
