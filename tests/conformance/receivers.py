"""Real receivers for EMR tests: Medplum's FHIR router on node (tests/fhir_server/server.mjs,
validating every write) and an MLLP listener (the ``hl7`` package's asyncio server) that keeps
every message it was sent, as an interface engine's inbound log would."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import free_port

FHIR_DIR = Path(__file__).resolve().parents[1] / "fhir_server"


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (FHIR_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        pytest.fail("node and tests/fhir_server/node_modules are required (scripts/install_servers.sh installs them)")
    return node


@contextmanager
def fhir_server() -> Iterator[str]:
    """A fresh FHIR R4 server on a free port; yields its base URL (``{base}/fhir/R4``)."""
    port = free_port()
    proc = subprocess.Popen(
        [_node(), "--experimental-websocket", "server.mjs", str(port)],
        cwd=FHIR_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None and "ready" in proc.stdout.readline()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def fhir_search(base: str, resource: str) -> list[dict]:
    """Every resource of a type on the test server."""
    bundle = httpx.get(f"{base}/fhir/R4/{resource}", params={"_count": 1000}).json()
    return [e["resource"] for e in bundle.get("entry", [])]


@dataclass
class MllpListener:
    """A real MLLP listener; ``answers`` is the ACK code for each message in turn (then AA)."""

    answers: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)  # MSH-10 of every message received
    accepted: set[str] = field(default_factory=set)  # MSH-10 acknowledged AA (the receiver's record)
    messages: list[str] = field(default_factory=list)  # every message as received (ER7)
    port: int = 0


@contextmanager
def mllp_listener(answers: list[str] | None = None) -> Iterator[MllpListener]:
    from hl7.mllp import start_hl7_server

    state = MllpListener(answers=list(answers or []), port=free_port())
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def handle(reader, writer) -> None:  # type: ignore[no-untyped-def]
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                control = str(message.segment("MSH")[10])
                state.received.append(control)
                state.messages.append(str(message))
                code = state.answers.pop(0) if state.answers else "AA"
                if code == "AA":
                    state.accepted.add(control)
                if code != "SILENT":
                    writer.writemessage(message.create_ack(code))
                    await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    stop = asyncio.Event()

    async def main() -> None:
        server = await start_hl7_server(handle, host="127.0.0.1", port=state.port, encoding="utf-8")
        started.set()
        await stop.wait()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let handlers finish closing their writers

    def run() -> None:
        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(5)
    try:
        yield state
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
