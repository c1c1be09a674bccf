"""One typed ``Settings`` object, read from YAML; secrets may come from the environment only.

Nothing is instantiated at import time. ``Settings.load()`` reads ``configs/settings/dev.yaml``
(the embedded defaults: local folder store, SQLite results, registry models) unless told
otherwise by ``--settings`` or ``DXASSIST_SETTINGS``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

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


class StoreSettings(_Strict):
    kind: Literal["local"] = "local"
    path: Path = Path("var/store")


class ResultsSettings(_Strict):
    sqlite_path: Path = Path("var/results.sqlite3")


class SecuritySettings(_Strict):
    study_ref_key: SecretStr = SecretStr(_DEV_KEY)


class ScreeningSettings(_Strict):
    max_frames_per_image: int = Field(default=32, ge=1)
    batch_size: int = Field(default=4, ge=1)


class Settings(_Strict):
    environment: Literal["dev", "test", "prod"] = "dev"
    models: list[ModelSettings] = Field(min_length=1)
    store: StoreSettings = StoreSettings()
    results: ResultsSettings = ResultsSettings()
    security: SecuritySettings = SecuritySettings()
    screening: ScreeningSettings = ScreeningSettings()

    @model_validator(mode="after")
    def _no_dev_secrets_in_prod(self) -> Settings:
        if self.environment == "prod" and self.security.study_ref_key.get_secret_value() == _DEV_KEY:
            raise ValueError("security.study_ref_key: set DXASSIST_STUDY_REF_KEY; the dev key is refused in prod")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None) -> Settings:
        """Read YAML; relative paths resolve against the repository; secrets from the env."""
        p = Path(path or os.environ.get("DXASSIST_SETTINGS") or DEFAULT_SETTINGS)
        data = yaml.safe_load(p.read_text()) or {}
        key = os.environ.get("DXASSIST_STUDY_REF_KEY")
        if key:
            data.setdefault("security", {})["study_ref_key"] = key
        return cls.model_validate(data).resolved()

    def resolved(self) -> Settings:
        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else REPO_ROOT / path

        return self.model_copy(
            update={
                "store": self.store.model_copy(update={"path": absolute(self.store.path)}),
                "results": self.results.model_copy(update={"sqlite_path": absolute(self.results.sqlite_path)}),
            }
        )
