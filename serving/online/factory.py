"""Build the plain objects of the service from ``Settings`` (no Ray here)."""

from __future__ import annotations

from models.predictor import OnnxPredictor
from models.registry import resolve
from serving.core.screening import StudyScreener
from serving.delivery.worker import Sink
from serving.dicom.dimse import source_from_settings
from serving.dicom.sources import SearchableSource, StudySource
from serving.dicom.sources.dicomweb import DicomWebSource
from serving.dicom.sources.local import LocalFolderSource
from serving.dicom.store_back import DicomSrSink
from serving.emr.fhir import FhirSink, FhirTriageSink
from serving.emr.hl7 import Hl7MllpSink, Hl7PriorityUpdateSink
from serving.online.drift_watch import DriftWatch
from serving.online.pipeline import Pipeline, screener_options
from serving.online.service import ScreeningService
from serving.online.versions import VersionedPipeline, VersionRouter, split_ref
from serving.persistence.lifecycle import LifecycleStore
from serving.persistence.results import ResultsStore
from serving.settings import ModelSettings, ScpSettings, Settings


def build_predictor(model: ModelSettings, *, lone_runs: bool = True) -> OnnxPredictor:
    """Resolve ``id@version`` in the registry and open a verified session (checksum first);
    ``lone_runs=False`` where no caller ever marks a run ``RUN_ALONE`` (a model deployment)."""
    return OnnxPredictor(resolve(model.id, model.version), **model.session_options(lone_runs=lone_runs))


def build_screener(settings: Settings, *, sessions: bool = True) -> StudyScreener:
    """The screening core for the configured models. ``sessions=False`` opens no ONNX session:
    enough to prepare and assemble (a fetcher, an ingress that only assembles, a batch driver)."""
    return StudyScreener(
        [build_predictor(m) for m in settings.models] if sessions else [],
        manifests=[] if sessions else [resolve(m.id, m.version) for m in settings.models],
        **screener_options(settings),
    )


def build_source(settings: Settings) -> StudySource:
    """The configured study source (local folder, DICOMweb or DIMSE), with the models' acceptance rules."""
    if settings.store.kind == "dimse" and settings.store.dimse is not None:
        return source_from_settings(settings.store.dimse, settings.scp)  # C-GET or C-MOVE, TLS
    if settings.store.kind == "dicomweb" and settings.store.dicomweb is not None:
        web = settings.store.dicomweb
        return DicomWebSource(
            web.url,
            username=web.username,
            password=web.password.get_secret_value() if web.password else None,
            token=web.token.get_secret_value() if web.token else None,
            timeout_s=web.timeout_s,
            retries=web.retries,
            manifests=[resolve(m.id, m.version).manifest for m in settings.models],
        )
    return LocalFolderSource(settings.store.path)


def build_sinks(settings: Settings) -> dict[str, Sink]:
    """The configured result sinks (FHIR, HL7 MLLP, SR back to the store), by outbox name."""
    sinks: dict[str, Sink] = {}
    emr = settings.emr
    if emr.fhir is not None:
        token = emr.fhir.token.get_secret_value() if emr.fhir.token else None
        sinks["fhir"] = FhirSink(emr.fhir.url, identity=emr.identity, token=token, timeout_s=emr.fhir.timeout_s)
        if emr.fhir.priority_updates:
            sinks["fhir-triage"] = FhirTriageSink(
                emr.fhir.url, identity=emr.identity, token=token, timeout_s=emr.fhir.timeout_s
            )
    if emr.hl7 is not None:
        hl7 = emr.hl7
        sinks["hl7"] = Hl7MllpSink(hl7.host, hl7.port, identity=emr.identity, timeout_s=hl7.timeout_s)
        if hl7.priority_updates:
            sinks["hl7-triage"] = Hl7PriorityUpdateSink(
                hl7.host, hl7.port, identity=emr.identity, timeout_s=hl7.timeout_s
            )
    if settings.store.write_results:
        source = build_source(settings)
        if isinstance(source, DicomWebSource):
            sinks["dicom-sr"] = DicomSrSink(source, objects=settings.store.write_objects)
    return sinks


def scp_settings(settings: Settings) -> ScpSettings:
    """``scp`` with the PACS of a C-MOVE store allowed to deliver what a retrieval asked for."""
    dimse = settings.store.dimse
    if settings.store.kind == "dimse" and dimse is not None and dimse.retrieve == "move":
        return settings.scp.model_copy(
            update={"move_ae_titles": sorted({*settings.scp.move_ae_titles, dimse.called_ae_title})}
        )
    return settings.scp


def build_local_pipeline(settings: Settings) -> VersionedPipeline:
    """The in-process pipeline with model versions: the active version of each model re-read for
    every job (promote/rollback without a restart) and shadow versions that are never delivered
    (``serving.online.versions``)."""
    return VersionedPipeline(VersionRouter(settings, LifecycleStore(settings.results.target)), build_source(settings))


def build_service(settings: Settings, pipeline: Pipeline) -> ScreeningService:
    """The online service over ``pipeline`` with everything the settings configure (results
    database, sinks, SCP, poller, orders). Used by every runtime (ASGI, Ray Serve ingress)."""
    source = build_source(settings)
    service = ScreeningService(
        pipeline,
        pipeline.screener if isinstance(pipeline, VersionedPipeline) else build_screener(settings, sessions=False),
        ResultsStore(settings.results.target),
        settings.api,
        sinks=build_sinks(settings),
        scp=scp_settings(settings),
        poller=settings.poller,
        poll_source=source if isinstance(source, SearchableSource) else None,
        orders=settings.orders,
        delivery_lease_s=settings.results.delivery_lease_s,
    )
    if isinstance(pipeline, VersionedPipeline):
        pipeline.bind_metrics(service.metrics.registry)
    if settings.drift.interval_s > 0:
        service.periodic.append(drift_watch(settings, service, pipeline).run)
    return service


def drift_watch(settings: Settings, service: ScreeningService, pipeline: Pipeline) -> DriftWatch:
    """The service's drift monitor: the active version of each model (per job with versions,
    else the configured one), its baseline beside its manifest, gauges on the service's registry."""
    if isinstance(pipeline, VersionedPipeline):
        router = pipeline.router
        return DriftWatch(
            settings.drift,
            service.store,
            router.active,
            lambda ref: router.manifest(ref).directory / "baseline.json",
            service.metrics.registry,
        )
    configured = {m.id: resolve(m.id, m.version).manifest.version for m in settings.models}
    return DriftWatch(
        settings.drift,
        service.store,
        lambda: dict(configured),
        lambda ref: resolve(*split_ref(ref)).directory / "baseline.json",
        service.metrics.registry,
    )
