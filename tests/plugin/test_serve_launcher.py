"""The launcher refuses a port another process already serves (its /health would pass for ours)."""

from __future__ import annotations

import socket

import pytest

from vllm_safeguard.apps.serve import LaunchError, start_server


def test_port_in_use_is_refused_before_launch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_server(["--model", str(tmp_path), "--port", str(port)], log_path=tmp_path / "log")
    assert not (tmp_path / "log").exists()  # nothing was started
