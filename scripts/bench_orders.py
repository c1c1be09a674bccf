"""What storing an order before its ACK costs: the HL7 v2 order listener against a bare MLLP
listener that answers AA without parsing or storing, measured in this one run on this machine.

    python scripts/bench_orders.py [--messages 500]

One MLLP client (the ``hl7`` package) sends ORM^O01 messages one after another (HL7 original
mode: the next only after the ACK) over one connection to each listener in turn:
  1. baseline: the ``hl7`` package's server answering ``create_ack("AA")`` at once;
  2. dxassist: ``OrderListener`` (parse, check, one SQLite transaction with synchronous=FULL
     holding the message and its order, then the ACK).
Prints messages/s and ACK latency (p50, p99) for both and the ratios. Not a test: it asserts
nothing, it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hl7.client import MLLPClient  # noqa: E402
from hl7.mllp import start_hl7_server  # noqa: E402

from serving.online.orders import OrderListener  # noqa: E402
from serving.persistence.orders import OrderBook  # noqa: E402
from serving.settings import OrdersHl7Settings, OrdersSettings  # noqa: E402


def orm(n: int) -> str:
    obr = ["OBR", "1", f"PL{n}^EMR", f"FL{n}^RIS", "CXR2V^Chest X-ray 2 views^L"] + [""] * 13 + [f"ACC{n}"]
    return "\r".join(
        [
            f"MSH|^~\\&|RIS|HOSP|DXASSIST|DXA|20261201120000||ORM^O01^ORM_O01|MSG{n}|P|2.5.1",
            f"PID|1||PAT{n % 50}^^^HOSP^MR||DOE^JANE",
            f"ORC|NW|PL{n}^EMR|FL{n}^RIS||SC",
            "TQ1|1||||||||S^Stat^HL70485",
            "|".join(obr),
        ]
    )


@contextmanager
def in_loop(start: Callable[[], Any], stop: Callable[[Any], Any]) -> Iterator[None]:
    """Run an asyncio server in its own thread (as the service runs the listener)."""
    loop = asyncio.new_event_loop()
    ready, done = threading.Event(), asyncio.Event()

    async def main() -> None:
        handle = await start()
        ready.set()
        await done.wait()
        await stop(handle)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join(10)
        loop.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drive(port: int, messages: int, offset: int) -> tuple[float, list[float]]:
    latencies = []
    with MLLPClient("127.0.0.1", port) as client:
        start = time.perf_counter()
        for n in range(messages):
            t0 = time.perf_counter()
            ack = client.send_message(orm(offset + n))
            latencies.append(time.perf_counter() - t0)
            assert b"MSA|AA" in ack
        elapsed = time.perf_counter() - start
    return messages / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=500)
    args = parser.parse_args()

    async def bare(reader: Any, writer: Any) -> None:
        try:
            while True:
                message = await reader.readmessage()
                writer.writemessage(message.create_ack("AA"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    port = free_port()

    async def start_bare() -> Any:
        return await start_hl7_server(bare, host="127.0.0.1", port=port)

    async def stop_server(server: Any) -> None:
        server.close()
        await server.wait_closed()

    with in_loop(start_bare, stop_server):
        drive(port, 20, 10**6)  # warm-up
        base_rate, base_lat = drive(port, args.messages, 0)

    with tempfile.TemporaryDirectory() as tmp:
        book = OrderBook(Path(tmp) / "results.sqlite3")
        settings = OrdersSettings(hl7=OrdersHl7Settings(enabled=True, port=free_port()))
        listener = OrderListener(book, settings)

        async def start_listener() -> Any:
            await listener.start()
            return listener

        async def stop_listener(handle: Any) -> None:
            await handle.stop()

        with in_loop(start_listener, stop_listener):
            drive(settings.hl7.port, 20, 10**6)
            rate, lat = drive(settings.hl7.port, args.messages, 0)
        stored = book.message_count()
        book.close()

    def ms(values: list[float], q: float) -> float:
        return 1000 * statistics.quantiles(values, n=100)[int(q) - 1]

    print(f"messages: {args.messages} ORM^O01, one connection, sequential (original mode); stored: {stored}")
    print(
        f"baseline (bare AA, no parse/store): {base_rate:8.1f} msg/s  p50 {ms(base_lat, 50):.2f} ms  p99 {ms(base_lat, 99):.2f} ms"
    )
    print(f"dxassist (parse + store, then ACK): {rate:8.1f} msg/s  p50 {ms(lat, 50):.2f} ms  p99 {ms(lat, 99):.2f} ms")
    print(f"ratio: {rate / base_rate:.2f}x the baseline's rate; p50 latency {ms(lat, 50) / ms(base_lat, 50):.1f}x")


if __name__ == "__main__":
    main()
