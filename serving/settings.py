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

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SETTINGS = REPO_ROOT / "configs" / "settings" / "dev.yaml"
_DEV_KEY = "dev-only-study-ref-key-change-me"


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


class DicomWebSettings(_Strict):
    url: str
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    timeout_s: float = 10.0
    retries: int = 3


class StoreSettings(_Strict):
    """Where studies are read from: a local folder (embedded default) or a DICOMweb server."""

    kind: Literal["local", "dicomweb"] = "local"
    path: Path = Path("var/store")
    dicomweb: DicomWebSettings | None = None
    write_results: bool = False  # store the SR back into the study (STOW-RS)

    @model_validator(mode="after")
    def _dicomweb_needs_url(self) -> StoreSettings:
        if self.kind == "dicomweb" and self.dicomweb is None:
            raise ValueError("store.dicomweb: url required when kind is dicomweb")
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


class EmrSettings(_Strict):
    """Where findings go (each through the durable outbox). None configured: results stay local."""

    fhir: FhirSettings | None = None
    hl7: Hl7Settings | None = None


class ScpSettings(_Strict):
    """C-STORE SCP receiving pushed studies (PACS/Orthanc routing, modalities)."""

    enabled: bool = False
    ae_title: str = "DXASSIST"
    host: str = "127.0.0.1"
    port: int = 11112
    stable_age_s: float = 3.0


class PollerSettings(_Strict):
    """QIDO-RS poller catching studies a push missed; never screens a study twice."""

    enabled: bool = False
    interval_s: float = 60.0
    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX", "ES"])
    lookback_days: int = 1


class ResultsSettings(_Strict):
    """Results, jobs and outbox: SQLite by default; PostgreSQL when ``url`` is set (from
    ``DXASSIST_RESULTS__URL``, as ``postgresql://user:password@host/db``; it carries a secret)."""

    sqlite_path: Path = Path("var/results.sqlite3")
    url: SecretStr | None = None

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


class SecuritySettings(_Strict):
    study_ref_key: SecretStr = SecretStr(_DEV_KEY)


class ScreeningSettings(_Strict):
    max_frames_per_image: int = Field(default=32, ge=1)
    batch_size: int = Field(default=4, ge=1)


class ApiSettings(_Strict):
    """HTTP API and admission control. Tokens come from ``DXASSIST_API__TOKENS`` (comma-separated)."""

    host: str = "127.0.0.1"
    port: int = 8000
    tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    max_queued_routine: int = Field(default=200, ge=1)
    max_queued_stat: int = Field(default=50, ge=1)
    max_inflight: int = Field(default=4, ge=1)  # studies screened at once; one slot is kept for stat
    request_timeout_s: float = Field(default=120.0, gt=0)
    max_upload_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    spool_dir: Path = Path("var/spool")
    #: worklist ageing: a study moves up one level per this many minutes of waiting
    ageing_minutes: float = Field(default=60.0, gt=0)

    @field_validator("tokens", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """``DXASSIST_API__TOKENS=a,b`` as well as a YAML list."""
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DXASSIST_", env_nested_delimiter="__", extra="forbid", frozen=True, nested_model_default_partial_update=True
    )

    environment: Literal["dev", "test", "prod"] = "dev"
    models: list[ModelSettings] = Field(min_length=1)
    store: StoreSettings = StoreSettings()
    results: ResultsSettings = ResultsSettings()
    security: SecuritySettings = SecuritySettings()
    screening: ScreeningSettings = ScreeningSettings()
    api: ApiSettings = ApiSettings()
    scp: ScpSettings = ScpSettings()
    poller: PollerSettings = PollerSettings()
    emr: EmrSettings = EmrSettings()

    @model_validator(mode="after")
    def _no_dev_secrets_in_prod(self) -> Settings:
        if self.environment == "prod" and self.security.study_ref_key.get_secret_value() == _DEV_KEY:
            raise ValueError(
                "security.study_ref_key: set DXASSIST_SECURITY__STUDY_REF_KEY; the dev key is refused in prod"
            )
        if self.environment == "prod" and not self.api.tokens:
            raise ValueError("api.tokens: set DXASSIST_API__TOKENS; the API refuses to run open in prod")
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
    def load(cls, path: str | Path | None = None) -> Settings:
        """Read the YAML file, apply ``DXASSIST_<SECTION>__<FIELD>`` overrides, resolve relative paths
        against the repository."""
        p = Path(path or os.environ.get("DXASSIST_SETTINGS") or DEFAULT_SETTINGS)
        data: dict[str, Any] = yaml.safe_load(p.read_text()) or {}
        return cls(**data).resolved()

    def resolved(self) -> Settings:
        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else REPO_ROOT / path

        return self.model_copy(
            update={
                "store": self.store.model_copy(update={"path": absolute(self.store.path)}),
                "results": self.results.model_copy(update={"sqlite_path": absolute(self.results.sqlite_path)}),
                "api": self.api.model_copy(update={"spool_dir": absolute(self.api.spool_dir)}),
            }
        )
