"""DIMSE: a C-STORE SCP that receives pushed studies, and a C-FIND/C-GET study source.

``StoreScp`` (pynetdicom) persists each received instance to a per-study spool folder and
returns Success at once (handlers must not block an association). A watcher thread hands a
study to ``on_stable(study_uid, folder)`` once no instance of it has arrived for
``stable_age_s`` (Orthanc's StableAge idea). A failing handler answers 0xC211 and the
association survives; nothing is logged but counts and study refs.

``DimseSource`` retrieves a study with C-GET (no routing table needed on the PACS side).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

from models.errors import SourceUnavailable, StudyNotFound
from serving.core.screening import InstanceInput

logger = logging.getLogger(__name__)

#: Transfer syntaxes offered/accepted for storage: studies travel as stored (the PACS never
#: has to transcode; decoding happens here, with pylibjpeg).
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
]
#: SOP classes retrieved by C-GET, each proposed once per transfer syntax (an acceptor picks one
#: syntax per context, so one context per syntax is what lets the PACS send without transcoding).
GET_IMAGE_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
    "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL endoscopic
    "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # video endoscopic
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL photographic
]
GET_OTHER_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.88.11",  # basic text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # comprehensive 3D SR
]
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


@dataclass
class _Arrival:
    folder: Path
    last: float
    count: int = 0


@dataclass
class StoreScp:
    """C-STORE SCP spooling pushed studies; ``on_stable`` is called from a worker thread."""

    ae_title: str
    port: int
    spool_dir: Path
    on_stable: Callable[[str, Path], None]
    stable_age_s: float = 3.0
    host: str = "127.0.0.1"
    _arrivals: dict[str, _Arrival] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        for context in StoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        server = ae.start_server(
            (self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._handle_store)]
        )
        if server is None:
            raise RuntimeError("C-STORE SCP did not start")
        self._server = server
        self._watcher = threading.Thread(target=self._watch, name="scp-stable-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._watcher.join(timeout=5)

    def _handle_store(self, event: evt.Event) -> int:
        ds = event.dataset
        study_uid = str(ds.get("StudyInstanceUID", ""))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if not study_uid or not sop_uid:
            return 0xC211  # cannot file an instance without its UIDs
        with self._lock:
            arrival = self._arrivals.get(study_uid)
            if arrival is None:
                arrival = _Arrival(self.spool_dir / f"scp-{uuid.uuid4().hex}", time.monotonic())
                arrival.folder.mkdir(parents=True)
                self._arrivals[study_uid] = arrival
            arrival.last = time.monotonic()
            arrival.count += 1
            target = arrival.folder / f"{arrival.count:05d}.dcm"
        # the dataset as received, with its file meta: no re-encoding
        with target.open("wb") as fh:
            fh.write(event.encoded_dataset())
        return 0x0000

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                ready = [uid for uid, a in self._arrivals.items() if now - a.last >= self.stable_age_s]
                handed = [(uid, self._arrivals.pop(uid)) for uid in ready]
            for uid, arrival in handed:
                try:
                    self.on_stable(uid, arrival.folder)
                except Exception as exc:
                    logger.error("stable-study hand-off failed (%s); the spooled study is kept", type(exc).__name__)


class DimseSource:
    """A PACS over DIMSE: C-FIND to search, C-GET to retrieve a study's instances."""

    def __init__(
        self, host: str, port: int, called_aet: str, *, calling_aet: str = "DXASSIST", timeout_s: float = 30.0
    ) -> None:
        self.host, self.port, self.called_aet = host, port, called_aet
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s

    def _ae(self, contexts: list[str], storage: bool = False) -> AE:
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for context in contexts:
            ae.add_requested_context(context)
        if storage:
            for sop_class in GET_IMAGE_CLASSES:
                for syntax in TRANSFER_SYNTAXES[:13]:  # 7 x 13 + 4 + 1 <= 128 contexts
                    ae.add_requested_context(sop_class, [syntax])
            for sop_class in GET_OTHER_CLASSES:
                ae.add_requested_context(sop_class, TRANSFER_SYNTAXES[:2])
        return ae

    def search_studies(
        self, *, modality: str | None = None, study_date: str | None = None, study_instance_uid: str = ""
    ) -> list[str]:
        """C-FIND at study level: Study Instance UIDs matching the keys."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_instance_uid
        query.ModalitiesInStudy = modality or ""
        query.StudyDate = study_date or ""
        assoc = self._ae([STUDY_ROOT_FIND]).associate(self.host, self.port, ae_title=self.called_aet)
        if not assoc.is_established:
            raise SourceUnavailable("DIMSE association with the PACS failed")
        uids = []
        try:
            for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
                if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    uids.append(str(identifier.StudyInstanceUID))
        finally:
            assoc.release()
        return uids

    def instances(self, study_instance_uid: str) -> list[InstanceInput]:
        """C-FIND the study (PACS differ on C-GET of an unknown study), then C-GET it."""
        if not self.search_studies(study_instance_uid=study_instance_uid):
            raise StudyNotFound("study not found on the PACS")
        received: list[bytes] = []

        def on_store(event: evt.Event) -> int:
            received.append(bytes(event.encoded_dataset()))
            return 0x0000

        roles: list[SCP_SCU_RoleSelectionNegotiation] = [
            build_role(sop_class, scp_role=True) for sop_class in GET_IMAGE_CLASSES + GET_OTHER_CLASSES
        ]
        assoc = self._ae([STUDY_ROOT_GET], storage=True).associate(
            self.host,
            self.port,
            ae_title=self.called_aet,
            ext_neg=list(roles),
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        if not assoc.is_established:
            raise SourceUnavailable("DIMSE association with the PACS failed")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_instance_uid
        final = None
        try:
            for status, _ in assoc.send_c_get(query, STUDY_ROOT_GET):
                if status:
                    final = status.Status
        finally:
            assoc.release()
        if final not in (0x0000, 0xB000) or not received:
            raise SourceUnavailable(f"C-GET ended with status 0x{final or 0:04X} after {len(received)} instances")
        return [InstanceInput(data, f"instance {n + 1}") for n, data in enumerate(received)]
