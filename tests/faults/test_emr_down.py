"""Fault: the EMR's HL7 listener is down while studies are screened, then comes back. Real
MLLP listener (the ``hl7`` package's asyncio server), real outbox in SQLite, real model.

Every accepted screening must end DONE while the EMR is down (screening never waits for the
EMR), and every result must reach the EMR exactly once when it is back: the receiver's own
record (acknowledged MSH-10 control ids) counts one message per screening.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi.testclient import TestClient

from models.predictor import OnnxPredictor
from serving.core.screening import StudyScreener
from serving.dicom.sources.local import LocalFolderSource
from serving.emr.hl7 import Hl7MllpSink
from serving.online.api import LazyService, create_api
from serving.online.pipeline import LocalPipeline
from serving.online.service import ScreeningService
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings
from tests.conftest import write_synthetic_cxr
from tests.faults.tally import Tally
from tests.serving.test_api import uid_of


@dataclass
class Receiver:
    """What the EMR saw: every MSH-10 received, and each one it acknowledged AA."""

    received: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)


@contextmanager
def mllp_emr(port: int, receiver: Receiver) -> Iterator[None]:
    """An HL7 v2 MLLP listener on 127.0.0.1:``port`` answering AA, for the duration."""
    from hl7.mllp import start_hl7_server

    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), asyncio.Event()

    async def handle(reader, writer) -> None:  # type: ignore[no-untyped-def]
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                control = str(message.segment("MSH")[10])
                receiver.received.append(control)
                writer.writemessage(message.create_ack("AA"))
                await writer.drain()
                receiver.acknowledged.append(control)
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await start_hl7_server(handle, host="127.0.0.1", port=port)
        started.set()
        await stop.wait()
        server.close()
        await server.wait_closed()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert started.wait(5)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_emr_down_results_wait_in_the_outbox_and_arrive_exactly_once(tmp_path: Path, predictor: OnnxPredictor) -> None:
    store = tmp_path / "store"
    uids = [uid_of(write_synthetic_cxr(store / f"e{i}.dcm", seed=600 + i)) for i in range(5)]
    port = _free_port()  # nothing listens: the EMR is down
    screener = StudyScreener([predictor], study_ref_key=b"k")
    db = tmp_path / "results.sqlite3"

    def service() -> ScreeningService:
        return ScreeningService(
            LocalPipeline(screener, LocalFolderSource(store)),
            screener,
            ResultsStore(db),
            ApiSettings(spool_dir=tmp_path / "spool"),
            sinks={"hl7": Hl7MllpSink("127.0.0.1", port, timeout_s=1)},
        )

    tally, receiver = Tally(), Receiver()
    lazy = LazyService(service)
    with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
        for uid in uids:
            tally.submitted += 1
            answer = client.post("/v1/screenings", json={"study_instance_uid": uid})
            assert answer.status_code == 202
            tally.accepted.append(answer.json()["screening_id"])
        deadline = time.monotonic() + 30
        while any(client.get(f"/v1/screenings/{j}").json()["status"] != "DONE" for j in tally.accepted):
            assert time.monotonic() < deadline, "screening waited for the EMR"
            time.sleep(0.05)
        svc = lazy.started
        assert svc is not None and svc.outbox is not None
        time.sleep(1.0)  # delivery attempts fail against the dead port and back off
        assert svc.outbox.status().pending == len(uids)
        with mllp_emr(port, receiver):  # the EMR is back
            svc.outbox.due_now()  # an operator's "it is back": do not wait out the backoff
            deadline = time.monotonic() + 30
            while svc.outbox.status().pending:
                assert time.monotonic() < deadline, "deliveries did not resume"
                time.sleep(0.05)
            client.portal.call(svc.drain, 5.0)
        svc.close()
    tally.settle(db)
    delivered_twice = len(receiver.acknowledged) - len(set(receiver.acknowledged))
    print(tally.line("EMR down") + f", delivered {len(set(receiver.acknowledged))}, delivered twice {delivered_twice}")
    assert (tally.lost, tally.duplicated, tally.done) == (0, 0, len(uids))
    assert len(set(receiver.acknowledged)) == len(uids) and delivered_twice == 0
