"""DIMSE: a C-STORE SCP that receives pushed studies, and a C-FIND + C-GET/C-MOVE study source.

``StoreScp`` (pynetdicom) persists each received instance to a per-study spool folder and
returns Success at once (handlers must not block an association). A watcher thread hands a
study to ``on_stable(study_uid, folder)`` once no instance of it has arrived for
``stable_age_s`` (Orthanc's StableAge idea). A failing handler answers 0xC211 and the
association survives; nothing is logged but counts and study refs.

The spool is durable: each study folder holds its Study UID (``study-uid``) and instances are
written under a temporary name and renamed when complete, so a restart finds every study that
was not handed on yet, with every instance received whole, and resumes its stability timing
(``handed`` marks a folder whose study became a job; the online service keeps the instances in
the results database with the job and removes the folder, ADR 0021). In a cluster the SCP runs
in the one process that holds its lease in the results database.

Who may talk to it: ``allowed_ae_titles`` (calling AE titles that may push; None: any) and
``move_ae_titles`` (PACS whose C-MOVE deliveries are awaited: accepted only for a study a
retrieval asked for). Others are refused at association (A-ASSOCIATE-RJ, calling AE not
recognised) or per instance (0xA801-like refusal, 0xC211). TLS is an option on both sides
(``ssl.SSLContext``; pynetdicom's ``ssl_context``/``tls_args``).

``DimseSource`` retrieves a study with C-GET (no routing table needed on the PACS side) or
C-MOVE (the PACS must know our AE title: its instances arrive at a ``StoreScp`` of this
process, the service's own when it runs one on the same port, else one started for retrievals).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

from models.errors import SourceUnavailable, StudyNotFound
from serving.core.screening import InstanceInput
from serving.settings import DimseSettings, ScpSettings

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
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
#: spool folder markers (see the module docstring)
UID_FILE = "study-uid"
HANDED_FILE = "handed"
_REFUSED = 0xC211  # "cannot understand" family: the SCU sees a failed C-STORE, the association stays

#: the running SCPs of this process by port: a C-MOVE retrieval receives through the one on its port
_RECEIVERS: dict[int, StoreScp] = {}
_RECEIVERS_LOCK = threading.Lock()


def tls_context(
    certificate: Path,
    private_key: Path,
    ca_certificates: Path | None,
    *,
    server: bool,
    require_peer_certificate: bool = True,
) -> ssl.SSLContext:
    """A TLS context for DICOM associations (TLS 1.2+; the peer verified against ``ca_certificates``)."""
    context = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH,
        cafile=str(ca_certificates) if ca_certificates else None,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(certificate), str(private_key))
    if server:
        context.verify_mode = ssl.CERT_REQUIRED if require_peer_certificate else ssl.CERT_OPTIONAL
    return context


@dataclass
class _Arrival:
    folder: Path
    last: float
    count: int = 0


@dataclass
class StoreScp:
    """C-STORE SCP spooling pushed studies; ``on_stable`` is called from a worker thread and
    returns False when the study could not be handed on now (it is offered again later)."""

    ae_title: str
    port: int
    spool_dir: Path
    on_stable: Callable[[str, Path], bool | None] | None
    stable_age_s: float = 3.0
    host: str = "127.0.0.1"
    allowed_ae_titles: list[str] | None = None
    move_ae_titles: list[str] = field(default_factory=list)
    ssl_context: ssl.SSLContext | None = None
    _arrivals: dict[str, _Arrival] = field(default_factory=dict)
    _claims: dict[str, list[bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Resume the spool a previous process left, then listen."""
        resumed = self._resume()
        if resumed:
            logger.info("resumed %d spooled studies not yet handed on", resumed)
        ae = AE(ae_title=self.ae_title)
        for context in StoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        if self.allowed_ae_titles is not None:
            ae.require_calling_aet = sorted(set(self.allowed_ae_titles) | set(self.move_ae_titles))
        server = ae.start_server(
            (self.host, self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._handle_store)],
            ssl_context=self.ssl_context,
        )
        if server is None:
            raise RuntimeError("C-STORE SCP did not start")
        self._server = server
        with _RECEIVERS_LOCK:
            _RECEIVERS[self.port] = self
        self._watcher = threading.Thread(target=self._watch, name="scp-stable-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        with _RECEIVERS_LOCK:
            if _RECEIVERS.get(self.port) is self:
                del _RECEIVERS[self.port]
        self._stop.set()
        self._server.shutdown()
        self._watcher.join(timeout=5)

    def _resume(self) -> int:
        """Find spooled studies not handed on (a restart): whole instances only, timing restarted."""
        if not self.spool_dir.is_dir():
            return 0
        now = time.monotonic()
        for folder in sorted(self.spool_dir.glob("scp-*")):
            marker = folder / UID_FILE
            if not folder.is_dir() or not marker.is_file() or (folder / HANDED_FILE).exists():
                continue
            for partial in folder.glob("*.part"):
                partial.unlink(missing_ok=True)  # cut off mid-write: the sender was not told Success
            uid = marker.read_text(encoding="ascii", errors="replace").strip()[:64]
            count = max((int(p.stem) for p in folder.glob("*.dcm") if p.stem.isdigit()), default=0)
            if uid and uid not in self._arrivals:
                self._arrivals[uid] = _Arrival(folder, now, count)
        return len(self._arrivals)

    def claim(self, study_instance_uid: str) -> list[bytes]:
        """Collect the instances of a study a C-MOVE is about to deliver (instead of spooling)."""
        bucket: list[bytes] = []
        with self._lock:
            self._claims[study_instance_uid] = bucket
        return bucket

    def release(self, study_instance_uid: str) -> None:
        with self._lock:
            self._claims.pop(study_instance_uid, None)

    def _handle_store(self, event: evt.Event) -> int:
        ds = event.dataset
        study_uid = str(ds.get("StudyInstanceUID", ""))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if not study_uid or not sop_uid:
            return _REFUSED  # cannot file an instance without its UIDs
        calling = str(event.assoc.requestor.ae_title).strip()
        with self._lock:
            bucket = self._claims.get(study_uid)
        if bucket is not None:
            bucket.append(bytes(event.encoded_dataset()))
            return 0x0000
        if self.on_stable is None or (self.allowed_ae_titles is not None and calling not in self.allowed_ae_titles):
            return _REFUSED  # a retrieval-only receiver, or a PACS allowed only to answer our C-MOVEs
        with self._lock:
            arrival = self._arrivals.get(study_uid)
            if arrival is None:
                folder = self.spool_dir / f"scp-{uuid.uuid4().hex}"
                folder.mkdir(parents=True, mode=0o700)
                _write(folder / UID_FILE, study_uid.encode("ascii", errors="replace"))
                arrival = _Arrival(folder, time.monotonic())
                self._arrivals[study_uid] = arrival
            arrival.last = time.monotonic()
            arrival.count += 1
            target = arrival.folder / f"{arrival.count:05d}.dcm"
        # the dataset as received, with its file meta: no re-encoding; renamed once whole
        partial = target.with_suffix(".part")
        _write(partial, event.encoded_dataset())
        os.replace(partial, target)
        return 0x0000

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                ready = [uid for uid, a in self._arrivals.items() if now - a.last >= self.stable_age_s]
                handed = [(uid, self._arrivals.pop(uid)) for uid in ready]
            for uid, arrival in handed:
                try:
                    taken = self.on_stable(uid, arrival.folder) if self.on_stable is not None else True
                except Exception as exc:
                    logger.error("stable-study hand-off failed (%s); the spooled study is kept", type(exc).__name__)
                    taken = False
                if taken is False:  # offered again after another stable period
                    with self._lock:
                        arrival.last = time.monotonic()
                        self._arrivals.setdefault(uid, arrival)
                    continue
                try:
                    _write((arrival.folder / HANDED_FILE), b"")
                except OSError:
                    pass  # the job already removed a duplicate's folder


def _write(path: Path, data: bytes) -> None:
    """A new private file (0600) with ``data``, flushed to disk before the SCU hears Success."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class DimseSource:
    """A PACS over DIMSE: C-FIND to search, C-GET or C-MOVE to retrieve a study's instances."""

    def __init__(
        self,
        host: str,
        port: int,
        called_aet: str,
        *,
        calling_aet: str = "DXASSIST",
        timeout_s: float = 30.0,
        retrieve: Literal["get", "move"] = "get",
        move_destination: str | None = None,
        move_host: str = "127.0.0.1",
        move_port: int = 11112,
        ssl_context: ssl.SSLContext | None = None,
        receiver_ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port, self.called_aet = host, port, called_aet
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s
        self.retrieve = retrieve
        self.move_destination = move_destination or calling_aet
        self.move_host, self.move_port = move_host, move_port
        self.ssl_context = ssl_context
        self.receiver_ssl_context = receiver_ssl_context
        self._own_receiver: StoreScp | None = None
        self._receiver_lock = threading.Lock()

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

    def _associate(self, ae: AE, **kwargs: Any) -> Association:
        tls = (self.ssl_context, self.host) if self.ssl_context is not None else None
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, tls_args=tls, **kwargs)
        if not assoc.is_established:
            raise SourceUnavailable("DIMSE association with the PACS failed")
        return assoc

    def search_studies(
        self,
        *,
        modality: str | None = None,
        study_date: str | None = None,
        study_instance_uid: str = "",
        accession_number: str = "",
    ) -> list[str]:
        """C-FIND at study level: Study Instance UIDs matching the keys."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_instance_uid
        query.AccessionNumber = accession_number
        query.ModalitiesInStudy = modality or ""
        query.StudyDate = study_date or ""
        assoc = self._associate(self._ae([STUDY_ROOT_FIND]))
        uids = []
        try:
            for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
                if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    uids.append(str(identifier.StudyInstanceUID))
        finally:
            assoc.release()
        return uids

    def instances(self, study_instance_uid: str) -> list[InstanceInput]:
        """C-FIND the study (PACS differ on C-GET/C-MOVE of an unknown study), then retrieve it."""
        if not self.search_studies(study_instance_uid=study_instance_uid):
            raise StudyNotFound("study not found on the PACS")
        if self.retrieve == "move":
            received, final = self._move(study_instance_uid)
        else:
            received, final = self._get(study_instance_uid)
        if final not in (0x0000, 0xB000) or not received:
            raise SourceUnavailable(
                f"C-{self.retrieve.upper()} ended with status 0x{final or 0:04X} after {len(received)} instances"
            )
        return [InstanceInput(data, f"instance {n + 1}") for n, data in enumerate(received)]

    def _get(self, study_instance_uid: str) -> tuple[list[bytes], int | None]:
        received: list[bytes] = []

        def on_store(event: evt.Event) -> int:
            received.append(bytes(event.encoded_dataset()))
            return 0x0000

        roles: list[SCP_SCU_RoleSelectionNegotiation] = [
            build_role(sop_class, scp_role=True) for sop_class in GET_IMAGE_CLASSES + GET_OTHER_CLASSES
        ]
        assoc = self._associate(
            self._ae([STUDY_ROOT_GET], storage=True),
            ext_neg=list(roles),
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        final = None
        try:
            for status, _ in assoc.send_c_get(_study_query(study_instance_uid), STUDY_ROOT_GET):
                if status:
                    final = int(status.Status)
        finally:
            assoc.release()
        return received, final

    def _receiver(self) -> StoreScp:
        """The SCP that receives our C-MOVE: the service's own on ``move_port`` when it runs in
        this process, else one started here that accepts only what a retrieval claimed."""
        with _RECEIVERS_LOCK:
            running = _RECEIVERS.get(self.move_port)
        if running is not None:
            return running
        with self._receiver_lock:
            if self._own_receiver is None:
                receiver = StoreScp(
                    self.move_destination,
                    self.move_port,
                    Path(os.devnull),
                    None,
                    host=self.move_host,
                    allowed_ae_titles=[],
                    move_ae_titles=[self.called_aet],
                    ssl_context=self.receiver_ssl_context,
                )
                receiver.start()
                self._own_receiver = receiver
            return self._own_receiver

    def _move(self, study_instance_uid: str) -> tuple[list[bytes], int | None]:
        receiver = self._receiver()
        bucket = receiver.claim(study_instance_uid)
        final = None
        try:
            assoc = self._associate(self._ae([STUDY_ROOT_MOVE]))
            try:
                responses = assoc.send_c_move(_study_query(study_instance_uid), self.move_destination, STUDY_ROOT_MOVE)
                for status, _ in responses:
                    if status:
                        final = int(status.Status)
            finally:
                assoc.release()
            # the PACS answers the C-MOVE only after its last sub-operation's C-STORE-RSP: all here
            return list(bucket), final
        finally:
            receiver.release(study_instance_uid)

    def close(self) -> None:
        """Stop the retrieval receiver this source started (if any)."""
        with self._receiver_lock:
            if self._own_receiver is not None:
                self._own_receiver.stop()
                self._own_receiver = None


def _study_query(study_instance_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    return query


def scp_tls_context(settings: ScpSettings) -> ssl.SSLContext | None:
    """The SCP's TLS context from ``scp.tls`` (None: plain TCP)."""
    tls = settings.tls
    if tls is None:
        return None
    return tls_context(
        tls.certificate,
        tls.private_key,
        tls.ca_certificates,
        server=True,
        require_peer_certificate=tls.require_peer_certificate,
    )


def source_from_settings(settings: DimseSettings, scp: ScpSettings) -> DimseSource:
    """The DIMSE source as ``store.dimse`` (and, for C-MOVE, ``scp``) configure it."""
    tls = settings.tls
    client_tls = (
        tls_context(tls.certificate, tls.private_key, tls.ca_certificates, server=False) if tls is not None else None
    )
    return DimseSource(
        settings.host,
        settings.port,
        settings.called_ae_title,
        calling_aet=settings.calling_ae_title,
        timeout_s=settings.timeout_s,
        retrieve=settings.retrieve,
        move_destination=settings.move_destination or scp.ae_title,
        move_host=scp.host,
        move_port=scp.port,
        ssl_context=client_tls,
        receiver_ssl_context=scp_tls_context(scp),
    )
