"""Waiting for a started service to become ready (the CLI, the demo, tests and benchmarks)."""

from __future__ import annotations

import time

import httpx


def wait_ready(base_url: str, timeout_s: float = 180.0, *, hint: str = "", verify: bool = True) -> None:
    """Poll ``/readyz`` until the models have loaded and passed their self-test (``verify``
    False: a loopback HTTPS probe of our own listener, whose certificate names the public host).

    Raises:
        TimeoutError: not ready in time (the last answer or error type, and ``hint``, say why).
    """
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=5.0, verify=verify)
            if response.status_code == 200:
                return
            last = str(response.status_code)
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise TimeoutError(f"service not ready after {timeout_s:.0f} s (last: {last}){hint}")
