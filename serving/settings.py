"""One typed ``Settings`` object: a YAML file, overridden by environment variables by one rule.

Nothing is instantiated at import time. ``Settings.load()`` reads ``configs/settings/dev.yaml``
(the embedded defaults: local folder store, SQLite results, registry models) unless told
otherwise by ``--settings`` or ``DXASSIST_SETTINGS``. Then every field can be overridden from the
environment as ``DXASSIST_<SECTION>__<FIELD>`` (nested sections joined by ``__``), which is how
secrets arrive: ``DXASSIST_API__TOKENS`` (comma-separated), ``DXASSIST_RESULTS__URL``,
``DXASSIST_SECURITY__STUDY_REF_KEY``, ``DXASSIST_STORE__DICOMWEB__PASSWORD``,
``DXASSIST_EMR__FHIR__TOKEN``. The environment wins over the file. ``configs/settings/prod.example.yaml``
shows a production file; Serve config files only name the settings file (``args.settings_path``).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import time
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from models.manifest import CodingSchemeValues

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SETTINGS = REPO_ROOT / "configs" / "settings" / "dev.yaml"
#: where a dev/test install keeps its own study-ref key when none is configured (created once, 0600)
INSTALL_KEY_FILE = REPO_ROOT / "var" / "study-ref.key"
#: the minimum length of a prod API token (``secrets.token_urlsafe(32)`` gives 43 characters)
MIN_TOKEN_CHARS = 32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Strict):
    id: str
    version: str = "latest"
    providers: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    intra_op_threads: int | None = None
    #: ORT threads spin while idle (fastest when inference has the cores to itself); off by
    #: default because the service and batch jobs share the cores with decode and HTTP
    allow_spinning: bool = False
    #: with ``allow_spinning``: threads go on spinning after a run ends (ORT's own default); off,
    #: they spin only while a run is under way
    spin_after_run: bool = False
    #: on CPU, a second ONNX Runtime session for a run that has the machine to itself (the
    #: online service with one screening under way and nothing waiting): every core, threads
    #: spinning while the run is under way. Concurrent runs keep the main session, whose threads
    #: sleep. Costs the memory of one more session (ADR 0011)
    lone_run_session: bool = True
    #: ONNX Runtime's CPU memory arena keeps the largest concurrent peak of inference buffers for
    #: the life of the session: off by default, so that memory returns to its idle level after a
    #: burst (measured: +22% -> +4% after 200 uploads at 32 clients, about 2 ms more per
    #: inference; README "Measured speed")
    cpu_mem_arena: bool = False
    #: versions run in shadow beside the active one (results stored marked shadow, never
    #: delivered); ``dxassist models shadow`` adds to them at run time (serving.online.versions)
    shadow: list[str] = Field(default_factory=list)
    #: digests of ``version`` pinned at deploy time by the Serve driver (``serving.rayserve.app``):
    #: a replica whose registry holds that version with another manifest or artifact refuses to
    #: start (``PinnedVersionMismatch``). Unset: whatever this node's registry holds
    manifest_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    artifact_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    def session_options(self, *, intra_op_threads: int | None = None, lone_runs: bool = True) -> dict[str, Any]:
        """``OnnxPredictor``'s keyword arguments that these settings choose. ``intra_op_threads``
        overrides the configured count (a batch worker with one core); ``lone_runs=False`` for a
        process that never has lone runs (batch workers, model deployments): no second session."""
        return {
            "providers": self.providers,
            "intra_op_threads": intra_op_threads or self.intra_op_threads,
            "allow_spinning": self.allow_spinning,
            "spin_after_run": self.spin_after_run,
            "cpu_mem_arena": self.cpu_mem_arena,
            "lone_run_session": self.lone_run_session and lone_runs,
        }


class DicomWebSettings(_Strict):
    url: str
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    timeout_s: float = 10.0
    retries: int = 3


class DimseTlsSettings(_Strict):
    """DICOM TLS (PS3.15 Annex B secure transport) for an association: this side's certificate
    and key (PEM), the CA bundle that peers' certificates must chain to, and whether a peer
    must present one (mutual TLS)."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_peer_certificate: bool = True


class DimseSettings(_Strict):
    """A PACS over DIMSE: C-FIND to search, C-GET or C-MOVE to retrieve (ADR 0008). With
    ``retrieve: move`` the PACS sends the study to ``move_destination`` (an AE title it knows;
    by default ``scp.ae_title``), received by the service's own C-STORE SCP (``scp.host``/``port``)."""

    host: str
    port: int = Field(ge=1, le=65535)
    called_ae_title: str
    calling_ae_title: str = "DXASSIST"
    timeout_s: float = Field(default=30.0, gt=0)
    retrieve: Literal["get", "move"] = "get"
    move_destination: str | None = None
    tls: DimseTlsSettings | None = None


class StoreSettings(_Strict):
    """Where studies are read from: a local folder (embedded default), a DICOMweb server, or a
    PACS over DIMSE (C-FIND + C-GET)."""

    kind: Literal["local", "dicomweb", "dimse"] = "local"
    path: Path = Path("var/store")
    dicomweb: DicomWebSettings | None = None
    dimse: DimseSettings | None = None
    write_results: bool = False  # store the SR back into the study (STOW-RS)
    #: which result objects go back into the study (some PACS refuse SR or PR): TID 1500 SR,
    #: GSPS with the regions, Secondary Captures (critical findings + summary), SEG of masks
    write_objects: list[Literal["sr", "gsps", "sc", "seg"]] = ["sr", "gsps", "sc", "seg"]

    @model_validator(mode="after")
    def _dicomweb_needs_url(self) -> StoreSettings:
        if self.kind == "dicomweb" and self.dicomweb is None:
            raise ValueError("store.dicomweb: url required when kind is dicomweb")
        if self.kind == "dimse" and self.dimse is None:
            raise ValueError("store.dimse: host, port and called_ae_title required when kind is dimse")
        if self.write_results and self.kind != "dicomweb":
            raise ValueError("store.write_results needs a DICOMweb store")
        return self


class FhirSettings(_Strict):
    url: str  # base, e.g. https://emr.example/fhir/R4
    token: SecretStr | None = None
    timeout_s: float = 10.0
    #: also send a Task proposing ASAP reading when a critical finding raises the priority
    priority_updates: bool = False


class Hl7Settings(_Strict):
    host: str
    port: int
    timeout_s: float = 10.0
    #: also send ORM^O01 (XO, TQ1-9 ASAP) when a critical finding raises the priority
    priority_updates: bool = False


# -- the site's identity in messages to the EMR/RIS (``emr.identity``; README "Site identity") --


class HierarchicDesignator(_Strict):
    """HL7 v2 HD: a namespace id and, where the site assigns one, a universal id (an OID)."""

    namespace_id: str = Field(min_length=1, max_length=20)
    universal_id: str | None = Field(default=None, max_length=199)
    universal_id_type: Literal["ISO", "DNS", "URI", "UUID", "GUID", "L"] | None = None


class Coded(_Strict):
    """A code with its HL7 v2 coding system name (table 0396) and its FHIR system URI."""

    code: str = Field(min_length=1)
    display: str = Field(min_length=1)
    hl7_system: str = Field(min_length=1)
    fhir_system: str = Field(min_length=1)


class ReportKind(_Strict):
    """What the report is (OBR-4 / ``DiagnosticReport.code``) and which diagnostic service
    section files it (OBR-24, table 0074 / ``DiagnosticReport.category``; None: not sent)."""

    code: Coded
    diagnostic_service: str | None = None


_LOINC = {"hl7_system": "LN", "fhir_system": "http://loinc.org"}
IMAGING_REPORT = ReportKind(
    code=Coded(code="18748-4", display="Diagnostic imaging study", **_LOINC), diagnostic_service="RAD"
)
ENDOSCOPY_REPORT = ReportKind(code=Coded(code="18751-8", display="Endoscopy study", **_LOINC))

#: code system names and URIs per manifest coding scheme (HL7 v2 table 0396 / FHIR)
_DEFAULT_HL7_SYSTEMS = {"SCT": "SCT", "RADLEX": "RADLEX", "DCM": "DCM"}
_DEFAULT_FHIR_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "RADLEX": "http://radlex.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
}


class SiteIdentity(_Strict):
    """Names, authorities and code systems of this site (``emr.identity``).

    HL7 v2: MSH-3..6 from the four applications/facilities; PID-3 is
    ``id^^^patient_id_authority^patient_id_type``; order numbers (ORC-2/3, OBR-2/3) carry
    ``placer_authority``/``filler_authority``. FHIR: the identifier systems below, and
    ``fhir_references`` says whether Patient, ServiceRequest and ImagingStudy are referenced
    literally after a search on the server (``resolve``: needs the server to hold them) or by
    identifier only (``identifier``: an explicit site choice for servers that resolve logical
    references themselves)."""

    sending_application: HierarchicDesignator = HierarchicDesignator(namespace_id="DXASSIST")
    sending_facility: HierarchicDesignator = HierarchicDesignator(namespace_id="DXASSIST")
    receiving_application: HierarchicDesignator = HierarchicDesignator(namespace_id="EMR")
    receiving_facility: HierarchicDesignator = HierarchicDesignator(namespace_id="HOSPITAL")
    #: MSH-11 (table 0103): P production, T training, D debugging
    processing_id: Literal["P", "T", "D"] = "P"
    #: the RIS/order filler that receives priority-change requests (MSH-5 of OMG^O19)
    order_receiving_application: HierarchicDesignator = HierarchicDesignator(namespace_id="RIS")
    patient_id_authority: HierarchicDesignator = HierarchicDesignator(namespace_id="HOSPITAL")
    #: HL7 table 0203 (MR: medical record number)
    patient_id_type: str = Field(default="MR", min_length=1, max_length=5)
    placer_authority: HierarchicDesignator = HierarchicDesignator(namespace_id="EMR")
    filler_authority: HierarchicDesignator = HierarchicDesignator(namespace_id="RIS")
    #: FHIR identifier systems of the site's patient ids, accession numbers (the order's filler
    #: number, ``ServiceRequest.identifier``), and dxassist's report ids
    patient_id_system: str = "urn:oid:2.16.840.1.113883.19.5.1"
    accession_system: str = "urn:oid:2.16.840.1.113883.19.5.2"
    report_id_system: str = "urn:oid:2.16.840.1.113883.19.5.3"
    fhir_references: Literal["resolve", "identifier"] = "resolve"
    #: canonical URL of dxassist's CodeSystem (local codes: probability, region, not-screened
    #: reasons); ``serving.emr.fhir_resources.code_system`` builds the resource to load on a server
    local_code_system_uri: str = "urn:oid:2.16.840.1.113883.19.5.4"
    #: HL7 local coding system (table 0396 "99zzz") for dxassist's own codes (probability,
    #: not-screened reasons); the FHIR counterpart is ``local_code_system_uri``
    local_coding_system: str = Field(default="99DXA", pattern=r"^99[A-Z0-9]{1,3}$")
    #: coding system names (HL7 v2) and URIs (FHIR) for the manifest's coding schemes
    hl7_coding_systems: dict[CodingSchemeValues, str] = Field(
        default_factory=lambda: {CodingSchemeValues(k): v for k, v in _DEFAULT_HL7_SYSTEMS.items()}
    )
    fhir_coding_systems: dict[CodingSchemeValues, str] = Field(
        default_factory=lambda: {CodingSchemeValues(k): v for k, v in _DEFAULT_FHIR_SYSTEMS.items()}
    )
    #: report code and service section per model id; models not named get ``default_report``
    reports: dict[str, ReportKind] = Field(default_factory=lambda: {"endoscopy-polyp": ENDOSCOPY_REPORT})
    default_report: ReportKind = IMAGING_REPORT
    #: the zone of DICOM study dates/times that carry no TimezoneOffsetFromUTC
    study_timezone: str = "UTC"

    @field_validator("study_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"study_timezone: unknown zone {value!r}") from exc
        return value

    @field_validator("hl7_coding_systems", "fhir_coding_systems")
    @classmethod
    def _every_scheme(cls, value: dict[CodingSchemeValues, str]) -> dict[CodingSchemeValues, str]:
        missing = set(CodingSchemeValues) - set(value)
        if missing:
            raise ValueError(f"coding systems missing for {sorted(m.value for m in missing)}")
        return value

    def report_kind(self, model_ids: list[str]) -> ReportKind:
        """The report kind for a result's models (the first named one), else the default."""
        for model_id in model_ids:
            if model_id in self.reports:
                return self.reports[model_id]
        return self.default_report

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.study_timezone)


class EmrSettings(_Strict):
    """Where findings go (each through the durable outbox). None configured: results stay local.
    ``identity``: every name, authority and code system a receiving interface engine matches on."""

    fhir: FhirSettings | None = None
    hl7: Hl7Settings | None = None
    identity: SiteIdentity = SiteIdentity()


class ScpSettings(_Strict):
    """C-STORE SCP receiving pushed studies (PACS/Orthanc routing, modalities)."""

    enabled: bool = False
    ae_title: str = "DXASSIST"
    host: str = "127.0.0.1"
    port: int = 11112
    stable_age_s: float = 3.0
    #: calling AE titles that may push studies (modalities, PACS routing rules); None: any
    #: (dev only). The PACS of ``store.dimse`` may always deliver the studies a C-MOVE asked for.
    allowed_ae_titles: list[str] | None = None
    #: PACS that may deliver C-MOVE results (only for a study a retrieval asked for); the
    #: factory adds ``store.dimse.called_ae_title`` when ``store.dimse.retrieve`` is ``move``
    move_ae_titles: list[str] = Field(default_factory=list)
    tls: DimseTlsSettings | None = None


class PollerSettings(_Strict):
    """QIDO-RS poller catching studies a push missed; never screens a study twice."""

    enabled: bool = False
    interval_s: float = 60.0
    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX", "ES"])
    lookback_days: int = 1


class OrdersHl7Settings(_Strict):
    """The HL7 v2 MLLP listener for inbound orders (ORM^O01, OMI^O23) and patient merges
    (ADT^A40). Every message is bounded in size and time; each is stored before its ACK."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=2575, ge=1, le=65535)
    #: largest message accepted (bytes between the MLLP start and end blocks)
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024)
    #: a connection silent this long (no complete message) is closed
    idle_timeout_s: float = Field(default=60.0, gt=0)
    max_connections: int = Field(default=16, ge=1)
    #: MSH-3/4 of our ACKs
    application: str = "DXASSIST"
    facility: str = "DXASSIST"


class OrdersFhirSettings(_Strict):
    """FHIR R4 orders: the Subscription rest-hook endpoint (``POST /v1/fhir/notify``) is always
    there behind the API's auth; ``poll`` reads ServiceRequest/ImagingStudy from the server for
    sites without Subscriptions."""

    poll: bool = False
    url: str | None = None  # base, e.g. https://emr.example/fhir/R4
    token: SecretStr | None = None
    interval_s: float = Field(default=60.0, gt=0)
    timeout_s: float = Field(default=10.0, gt=0)


class OrdersSettings(_Strict):
    """Inbound orders (``orders``): which order priorities count as STAT (HL7 v2 table 0485
    codes for TQ1-9 / ORC-7.6, FHIR ``ServiceRequest.priority`` values)."""

    hl7: OrdersHl7Settings = OrdersHl7Settings()
    fhir: OrdersFhirSettings = OrdersFhirSettings()
    stat_codes: list[str] = Field(default_factory=lambda: ["S"])
    stat_fhir_priorities: list[str] = Field(default_factory=lambda: ["stat"])

    @model_validator(mode="after")
    def _poll_needs_url(self) -> OrdersSettings:
        if self.fhir.poll and not self.fhir.url:
            raise ValueError("orders.fhir.url: required when orders.fhir.poll is on")
        return self


class PixelRegion(_Strict):
    """A rectangle of the image, as fractions of its width and height (0..1)."""

    x0: float = Field(ge=0, le=1)
    y0: float = Field(ge=0, le=1)
    x1: float = Field(ge=0, le=1)
    y1: float = Field(ge=0, le=1)


class ExportSettings(_Strict):
    """``dxassist export``: de-identification for retraining (PS3.15 Basic Application Level
    Confidentiality Profile, ADR 0018) and the label layout.

    Options of the profile: ``retain_longitudinal_dates`` (Retain Longitudinal Temporal
    Information with Modified Dates: every date shifted by one secret offset per export, so
    intervals survive; off: dates removed), ``retain_patient_characteristics`` (sex, age, size,
    weight), ``clean_pixels`` (Clean Pixel Data: these regions are blanked in every image; an
    image whose header says BurnedInAnnotation YES is left out unless regions are set).
    ``mapping_file``: where the private table (original -> pseudonymous identifiers) goes; none
    is written unless it is set, and never inside the export folder."""

    retain_longitudinal_dates: bool = True
    retain_patient_characteristics: bool = False
    clean_pixels: list[PixelRegion] = Field(default_factory=list)
    mapping_file: Path | None = None
    layout: Literal["chestxray14", "kvasir"] = "chestxray14"
    #: seed of the pseudonyms and the date offset (a secret: the same seed gives the same
    #: pseudonyms across exports); None: a fresh random one per export (nothing links exports)
    seed: SecretStr | None = None


#: the outbox's default delivery lease (``ResultsSettings.delivery_lease_s``)
DELIVERY_LEASE_S = 30.0


class ResultsSettings(_Strict):
    """Results, jobs and outbox: SQLite by default; PostgreSQL when ``url`` is set (from
    ``DXASSIST_RESULTS__URL``, as ``postgresql://user:password@host/db``; it carries a secret)."""

    sqlite_path: Path = Path("var/results.sqlite3")
    url: SecretStr | None = None
    #: an outbox worker holds the deliveries it claimed this long, renewed every third of it
    #: while it is still sending them; a worker that died (its node, its process) leaves its rows
    #: to the others once this runs out. Receivers drop a re-send by its stable id
    delivery_lease_s: float = Field(default=DELIVERY_LEASE_S, ge=1.0)

    @model_validator(mode="after")
    def _postgres_only(self) -> ResultsSettings:
        if self.url is not None and not self.url.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("results.url: only postgresql:// URLs are supported (SQLite uses sqlite_path)")
        return self

    @property
    def target(self) -> Path | str:
        """What ``ResultsStore``/``Outbox`` open: the PostgreSQL URL, else the SQLite file."""
        return self.url.get_secret_value() if self.url is not None else self.sqlite_path

    @property
    def where(self) -> str:
        """Where results go, for messages (never the URL: it holds a password)."""
        return "the PostgreSQL results database" if self.url is not None else str(self.sqlite_path)


def install_study_ref_key(path: Path | None = None) -> SecretStr:
    """This install's own study-ref key: read from ``path`` or created there once (random,
    mode 0600, atomically so that concurrent replicas agree). Never a constant shipped in
    the code: a public key would let anyone confirm a guessed UID from a log's study ref."""
    path = path or INSTALL_KEY_FILE
    for _ in range(50):
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return SecretStr(text)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it first: then read theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        time.sleep(0.01)
    raise OSError("study-ref key file could not be created")


class SecuritySettings(_Strict):
    """``study_ref_key`` keys the study refs that logs use instead of UIDs. Unset: this install's
    own random key (``var/study-ref.key``) in dev/test; prod refuses to start without one
    (``DXASSIST_SECURITY__STUDY_REF_KEY``)."""

    study_ref_key: SecretStr = Field(default_factory=install_study_ref_key)


class ScreeningSettings(_Strict):
    max_frames_per_image: int = Field(default=32, ge=1)
    #: images per ONNX Runtime call (service, Serve model deployments and batch jobs alike)
    batch_size: int = Field(default=4, ge=1)
    #: how long a Serve model deployment waits to fill a batch (0 on CPU: no added latency)
    batch_wait_s: float = Field(default=0.0, ge=0)
    #: where untrusted files are decoded (ADR 0013): ``process`` (replaceable worker processes,
    #: a codec crash costs one file) or ``inline`` (this process: tests and benchmarks only)
    decode_isolation: Literal["process", "inline"] = "process"
    #: decode worker processes (default: min(4, cores))
    decode_workers: int | None = Field(default=None, ge=1)
    #: this site's BodyPartExamined spellings mapped to the ones the models accept, e.g.
    #: ``{NGUC: CHEST}`` (case-insensitive; the content gate backs the header up, ADR 0015)
    body_part_aliases: dict[str, str] = Field(default_factory=dict)


class ServeSettings(_Strict):
    """How ``dxassist serve`` runs (ADR 0016): ``asgi`` is one process on uvicorn (one machine);
    ``ray`` is the Ray Serve application, whose ``topology`` ``auto`` is staged with a GPU and
    inline on CPU (ADR 0011)."""

    runtime: Literal["asgi", "ray"] = "asgi"
    topology: Literal["auto", "staged", "inline"] = "auto"
    #: staged topology: a call to a fetcher or model replica that died (node lost, actor killed)
    #: is sent again, to another replica, up to this many times (backoff ``retry_backoff_s``
    #: doubling, at most 10 s); after that the study fails with ``ReplicaUnavailable``
    replica_retries: int = Field(default=5, ge=0)
    retry_backoff_s: float = Field(default=0.5, gt=0)
    #: how often the ingress reads the Serve application's state (its downstream deployments'
    #: health for ``/readyz``, their running replicas for its in-flight limit)
    status_interval_s: float = Field(default=5.0, gt=0)
    #: staged topology: the ingress's in-flight limit follows its running fetcher replicas
    #: (replicas x their ``max_ongoing_requests``, plus the stat slot), re-read every
    #: ``status_interval_s``; off: ``api.max_inflight`` stays the limit
    follow_replicas: bool = True


class BatchSettings(_Strict):
    """Batch jobs: a process pool on one CPU-only machine, Ray Data on a cluster or a GPU node
    (ADR 0009, 0027); on Ray ``topology`` ``auto`` is staged with a GPU, fused on CPU."""

    #: ``auto``: ``local`` (a process pool here) for a job that would start its own one-node Ray
    #: on a CPU-only machine, else ``ray`` (a cluster address, a Ray already running, a GPU)
    runtime: Literal["auto", "ray", "local"] = "auto"
    topology: Literal["auto", "staged", "fused"] = "auto"
    #: fused actors, or local pool workers (default: one per CPU of the cluster or machine)
    workers: int | None = Field(default=None, ge=1)
    #: the driver's node reads every input file and ships its bytes through Ray's object store
    #: (ADR 0020); a larger file is NOT_SCREENED IMAGE_TOO_LARGE without being read
    max_file_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)


class TokenScopeValues(StrEnum):
    """What an API token may do. ``reader``: read results and the worklist; ``integration``:
    submit screenings and uploads, send the PACS webhook, read the screenings it asks for;
    ``admin``: everything, including metrics and the OpenAPI document."""

    READER = "reader"
    INTEGRATION = "integration"
    ADMIN = "admin"


class ApiToken(_Strict):
    """One API client: ``id`` names it in logs, audit and provenance (never the secret)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    scope: TokenScopeValues
    secret: SecretStr


def _parse_token(value: object, index: int) -> object:
    """``id:scope:secret`` (the environment form) or a bare secret (an admin token, for the
    demo and tests; ids ``token-1``, ``token-2``...); mappings pass through."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        return value
    parts = value.strip().split(":", 2)
    if len(parts) == 3 and parts[1] in {s.value for s in TokenScopeValues}:
        return {"id": parts[0], "scope": parts[1], "secret": parts[2]}
    return {"id": f"token-{index + 1}", "scope": TokenScopeValues.ADMIN.value, "secret": value.strip()}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiSettings(_Strict):
    """HTTP API and admission control.

    Tokens come from ``DXASSIST_API__TOKENS``: comma-separated ``id:scope:secret`` entries
    (scope ``reader``, ``integration`` or ``admin``; a bare secret is an admin token). Without
    any token the API is open, so it may bind loopback only (settings refuse anything else)."""

    host: str = "127.0.0.1"
    port: int = 8000
    tokens: Annotated[list[ApiToken], NoDecode] = Field(default_factory=list)
    #: largest JSON request body; larger bodies get 413 before they are read
    max_json_bytes: int = Field(default=64 * 1024, ge=1024)
    #: most files in one upload
    max_upload_files: int = Field(default=1000, ge=1)
    #: SIGTERM/shutdown: how long running screenings may take to finish before the process exits
    #: (what is left stays persisted and resumes at the next start); below the ingress's
    #: ``graceful_shutdown_timeout_s`` (60)
    drain_timeout_s: float = Field(default=50.0, ge=0)
    #: serve HTTPS directly with these PEM files (both or neither). Without them the API speaks
    #: plain HTTP: keep it on loopback behind the TLS reverse proxy of the README
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    max_queued_routine: int = Field(default=200, ge=1)
    max_queued_stat: int = Field(default=50, ge=1)
    #: studies screened at once (one slot is kept for stat); enough to keep every core busy while
    #: other studies wait on I/O or a decode worker. The default counts this machine's cores; a
    #: Ray Serve ingress in the staged topology starts with it, then follows its fetcher replicas
    #: (``serve.follow_replicas``)
    max_inflight: int = Field(default_factory=lambda: max(4, 4 * (os.cpu_count() or 1) + 1), ge=1)
    request_timeout_s: float = Field(default=120.0, gt=0)
    #: an upload whose client waits (``?wait=``) and finds a slot free is screened before its
    #: admission commits: ended within this many seconds, it is committed with its result in one
    #: transaction; longer, it is admitted then and the 202 goes out (ADR 0026). 0: admit first
    screen_before_ack_s: float = Field(default=1.0, ge=0)
    max_upload_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    #: uploads being received are held in memory while all of them together fit this; past it an
    #: upload streams into ``spool_dir`` instead (never read into memory whole while it arrives)
    upload_memory_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    #: where an upload past ``upload_memory_bytes`` streams in before its admission moves it into
    #: the results database (and where the C-STORE SCP receives a study until it is stable):
    #: local to this process's node
    spool_dir: Path = Path("var/spool")
    #: several ingresses on one results database: a job is claimed by one ingress for this long,
    #: renewed every third of it while queued or running there; another ingress takes it over
    #: only once a lease has run out (the first one died or lost the database)
    job_lease_s: float = Field(default=60.0, ge=1.0)
    #: how often an ingress looks for jobs nobody holds (left by a stopped ingress, or released
    #: by a draining one) and claims what its queue has room for
    claim_interval_s: float = Field(default=1.0, gt=0)
    #: the C-STORE SCP and the pollers run in one process per results database, elected through
    #: it: the holder renews every third of this lease; another process takes over once it ends
    leader_lease_s: float = Field(default=30.0, ge=1.0)
    #: an upload whose instances cannot be read (UploadUnavailable) is retried this many times
    #: (claims), then its job ends FAILED with UPLOAD_UNAVAILABLE (never a result)
    max_job_claims: int = Field(default=5, ge=1)
    #: worklist ageing: a study moves up one level per this many minutes of waiting
    ageing_minutes: float = Field(default=60.0, gt=0)
    #: OHIF viewer base URL (e.g. ``https://pacs.example/ohif``): the worklist page links each study to it
    ohif_url: str | None = None

    @field_validator("tokens", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """``DXASSIST_API__TOKENS=id:scope:secret,...`` as well as a YAML list."""
        if isinstance(value, str):
            value = [t for t in value.split(",") if t.strip()]
        if isinstance(value, list):
            return [_parse_token(v, i) for i, v in enumerate(value)]
        return value

    @model_validator(mode="after")
    def _open_api_binds_loopback_only(self) -> ApiSettings:
        if not self.tokens and not is_loopback(self.host):
            raise ValueError(
                "api.host: without api.tokens the API is open to anyone who can reach it, so it binds "
                "loopback only; set DXASSIST_API__TOKENS to bind another address"
            )
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("api.tls_certfile and api.tls_keyfile: both or neither")
        ids = [t.id for t in self.tokens]
        if len(set(ids)) != len(ids):
            raise ValueError("api.tokens: token ids must be unique")
        return self


def describe_errors(exc: ValidationError) -> str:
    """A validation error as ``location: reason`` lines, without the offending values."""
    lines = [f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors(include_input=False)]
    return "invalid settings:\n  " + "\n  ".join(lines)


def strong_secret(secret: str) -> bool:
    """Long enough and not a repeated pattern (``secrets.token_urlsafe(32)`` passes)."""
    return len(secret) >= MIN_TOKEN_CHARS and len(set(secret)) >= 10


class DriftSettings(_Strict):
    """Drift monitoring (serving.observability.drift): today's inputs and scores against the
    validation baseline of the active version. PSI above ``psi_alert`` (or a KS statistic above
    ``ks_alert`` for continuous values) is a drift; below ``min_studies`` a day (the service: a
    window) is not judged. The running service checks every ``interval_s`` seconds over the last
    ``window_h`` hours (``serving.online.drift_watch``; 0 turns that off); ``dxassist models
    drift`` reports per day."""

    psi_alert: float = Field(default=0.25, gt=0)
    ks_alert: float = Field(default=0.2, gt=0, le=1)
    min_studies: int = Field(default=30, ge=1)
    interval_s: float = Field(default=900.0, ge=0)
    window_h: float = Field(default=24.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DXASSIST_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    environment: Literal["dev", "test", "prod"] = "dev"
    models: list[ModelSettings] = Field(min_length=1)
    store: StoreSettings = StoreSettings()
    results: ResultsSettings = ResultsSettings()
    security: SecuritySettings = SecuritySettings()
    screening: ScreeningSettings = ScreeningSettings()
    serve: ServeSettings = ServeSettings()
    batch: BatchSettings = BatchSettings()
    api: ApiSettings = ApiSettings()
    scp: ScpSettings = ScpSettings()
    poller: PollerSettings = PollerSettings()
    emr: EmrSettings = EmrSettings()
    orders: OrdersSettings = OrdersSettings()
    export: ExportSettings = ExportSettings()
    drift: DriftSettings = DriftSettings()

    @model_validator(mode="after")
    def _no_dev_secrets_in_prod(self) -> Settings:
        # messages name settings and token ids, never any part of a secret
        if self.environment == "prod" and "study_ref_key" not in self.security.model_fields_set:
            raise ValueError(
                "security.study_ref_key: set DXASSIST_SECURITY__STUDY_REF_KEY; prod never uses an install key"
            )
        if self.environment == "prod" and len(self.security.study_ref_key.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"security.study_ref_key: at least {MIN_TOKEN_CHARS} characters in prod")
        if self.environment == "prod" and not self.api.tokens:
            raise ValueError("api.tokens: set DXASSIST_API__TOKENS; the API refuses to run open in prod")
        if self.environment == "prod":
            weak = [t.id for t in self.api.tokens if not strong_secret(t.secret.get_secret_value())]
            if weak:
                raise ValueError(
                    f"api.tokens: too weak for prod (at least {MIN_TOKEN_CHARS} characters, 10 distinct): "
                    + ", ".join(weak)
                )
        secrets_seen = [t.secret.get_secret_value() for t in self.api.tokens]
        if len(set(secrets_seen)) != len(secrets_seen):
            raise ValueError("api.tokens: two tokens share a secret (each client has its own)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment wins over the YAML file (passed as init values); no .env files."""
        return env_settings, init_settings

    @classmethod
    def load(cls, path: str | Path | None = None, *, resolve_paths: bool = True) -> Settings:
        """Read the YAML file, apply ``DXASSIST_<SECTION>__<FIELD>`` overrides, resolve relative paths
        against the repository (``resolve_paths=False``: keep them relative, for settings that
        travel to other nodes, each resolving them against its own install)."""
        p = Path(path or os.environ.get("DXASSIST_SETTINGS") or DEFAULT_SETTINGS)
        data: dict[str, Any] = yaml.safe_load(p.read_text()) or {}
        try:
            settings = cls(**data)
        except ValidationError as exc:
            # pydantic's own message quotes the input (secrets included): locations and reasons only
            raise ValueError(describe_errors(exc)) from None
        return settings.resolved() if resolve_paths else settings

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Settings:
        """Settings exactly as ``data`` says, validated, with no environment override: the form in
        which a deploying driver hands its resolved settings to Serve replicas on any node
        (``serving.rayserve.app``), whose own environment must not change them."""
        try:
            return _AsGiven(**data)
        except ValidationError as exc:
            raise ValueError(describe_errors(exc)) from None

    def resolved(self) -> Settings:
        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else REPO_ROOT / path

        return self.model_copy(
            update={
                "store": self.store.model_copy(update={"path": absolute(self.store.path)}),
                "results": self.results.model_copy(update={"sqlite_path": absolute(self.results.sqlite_path)}),
                "api": self.api.model_copy(
                    update={
                        "spool_dir": absolute(self.api.spool_dir),
                        "tls_certfile": absolute(self.api.tls_certfile) if self.api.tls_certfile else None,
                        "tls_keyfile": absolute(self.api.tls_keyfile) if self.api.tls_keyfile else None,
                    }
                ),
            }
        )


class _AsGiven(Settings):
    """``Settings.from_mapping``: the mapping alone, never this process's environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)
