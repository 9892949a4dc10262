"""trainer/local_services.py: the loopback services start, answer and are gone after their block."""

from __future__ import annotations

import socket

import boto3
import pytest

from trainer.local_services import free_port, s3_server


def test_free_port_can_be_bound_on_loopback():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_s3_server_serves_on_loopback_and_stops():
    with s3_server() as endpoint:
        assert endpoint.startswith("http://127.0.0.1:")
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="loopback")
        client.put_object(Bucket="loopback", Key="k", Body=b"v")
        assert client.get_object(Bucket="loopback", Key="k")["Body"].read() == b"v"
    port = int(endpoint.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
