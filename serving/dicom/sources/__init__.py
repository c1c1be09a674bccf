"""Where studies come from. Every source answers ``instances(study_uid)`` with the instances
(as bytes or paths) a model may need; the same contract tests run against all of them."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from serving.core.screening import InstanceInput


class StudySource(Protocol):
    def instances(self, study_instance_uid: str) -> list[InstanceInput]:
        """Raises ``StudyNotFound`` or ``SourceUnavailable`` (messages carry no UIDs)."""
        ...


@runtime_checkable
class SearchableSource(Protocol):
    """A store that can also be searched (DICOMweb QIDO-RS, DIMSE C-FIND): what the poller and
    batch queries need."""

    def search_studies(
        self,
        *,
        modality: str | None = None,
        study_date: str | None = None,
        study_instance_uid: str = "",
        accession_number: str = "",
    ) -> list[str]: ...

    def instances(self, study_instance_uid: str) -> list[InstanceInput]: ...
