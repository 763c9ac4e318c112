"""A lineage step's OpenLineage side: its datasets, facets and events, and those of the steps of an Airflow task.

Apart from :mod:`etl.lineage` because the OpenLineage client takes ~0.2 s to import: a step imports
this module only when it builds an event or runs inside an Airflow task, so a command whose steps
emit nothing (a re-run of a state already recorded) never loads the client.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    DatasetFacet,
    RunFacet,
    base_subset_dataset,
    dataset_version_dataset,
    error_message_run,
    output_statistics_output_dataset,
)

if TYPE_CHECKING:
    import sqlalchemy as sa

    from etl.lineage import Step

PRODUCER = "https://github.com/abc-mirror/abc-mirror"
JOB_NAMESPACE = os.environ.get("OPENLINEAGE_NAMESPACE", "abc-mirror")

EventType = Literal["START", "COMPLETE", "FAIL", "ABORT"]


@attr.define
class SourceObjectDatasetFacet(DatasetFacet):
    """A source object's MD5 as the release's manifest lists it (null for a key it does not list)."""

    md5: str | None


@attr.define
class StepsRunFacet(RunFacet):
    """The abc-mirror steps of a run, each with its release, the release manifest (key and MD5), the code
    version and its run in ``abc.lineage_run`` (``recorded`` False: an execution of the state that run
    already describes)."""

    steps: list[dict]


class Events:
    """The OpenLineage datasets, facets and events of one step."""

    def __init__(self, step: Step, bucket: str, database: str, warehouse: str, manifest: sa.Row | None) -> None:
        self.step, self.bucket, self.database, self.warehouse = step, bucket, database, warehouse
        self.manifest = manifest

    def _version(self) -> dict:
        return {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=self.step.release,
                                                                              producer=PRODUCER)}

    def inputs(self) -> list[InputDataset]:
        md5 = self.step.state["inputs"]
        objects = [InputDataset(namespace=f"s3://{self.bucket}", name=key, facets={
            **self._version(), "abcMirror_sourceObject": SourceObjectDatasetFacet(md5=md5.get(key), producer=PRODUCER)})
            for key in self.step.inputs]
        tables = [InputDataset(namespace=self.warehouse, name=f"{self.database}.{table}", facets=self._version())
                  for table in self.step.input_tables]
        return objects + tables

    def outputs(self) -> list[OutputDataset]:
        return [OutputDataset(namespace=self.warehouse, name=f"{self.database}.{table}", facets=self._version(),
                              outputFacets=self._output_facets(partition, rows))
                for (table, partition), rows in self.step.outputs.items()]

    @staticmethod
    def _output_facets(partition: str, rows: int | None) -> dict:
        """Rows written (``outputStatistics``) and the release partition written (``subset``)."""
        facets: dict = {}
        if rows is not None:
            facets["outputStatistics"] = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                rowCount=rows, producer=PRODUCER)
        if partition:
            facets["subset"] = base_subset_dataset.OutputSubsetOutputDatasetFacet(
                outputCondition=base_subset_dataset.PartitionSubsetCondition(
                    partitions=[base_subset_dataset.Partition(dimensions={"release": partition})]),
                producer=PRODUCER)
        return facets

    def step_facet(self) -> dict:
        """This step's entry of :class:`StepsRunFacet`."""
        return {"step": self.step.name, "release": self.step.release, "codeVersion": self.step.state["code_version"],
                "manifestKey": self.manifest.manifest_key if self.manifest else None,
                "manifestMd5": self.manifest.manifest_md5 if self.manifest else None,
                "lineageRunId": self.step.run_uuid, "recorded": self.step.recorded}

    def _run(self, error: BaseException | None = None) -> Run:
        facets: dict = {"abcMirror": StepsRunFacet(steps=[self.step_facet()], producer=PRODUCER)}
        if error is not None:
            facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=f"{type(error).__name__}: {error}", programmingLanguage="python", producer=PRODUCER)
        return Run(runId=self.step.run_uuid, facets=facets)

    def event(self, state: EventType, error: BaseException | None = None, at: datetime | None = None) -> RunEvent:
        return RunEvent(eventType=RunState(state), eventTime=(at or datetime.now(UTC)).isoformat(),
                        run=self._run(error), job=Job(namespace=JOB_NAMESPACE, name=f"abc_mirror.{self.step.name}"),
                        inputs=self.inputs(), outputs=self.outputs() if state not in ("START", "ABORT") else [],
                        producer=PRODUCER)


class TaskLineage:
    """What the steps run inside one Airflow task read and wrote, for the task's own OpenLineage events.

    Read once the steps have ended (Airflow's OpenLineage provider asks when the task completes or
    fails): a dataset two steps share is given once, every step is an entry of the ``abcMirror`` facet.
    """

    def __init__(self) -> None:
        self._steps: list[Events] = []

    def add(self, events: Events) -> None:
        self._steps.append(events)

    def inputs(self) -> list[InputDataset]:
        return _unique(d for step in self._steps for d in step.inputs())

    def outputs(self) -> list[OutputDataset]:
        return _unique(d for step in self._steps for d in step.outputs())

    def run_facets(self) -> dict:
        if not self._steps:
            return {}
        return {"abcMirror": StepsRunFacet(steps=[step.step_facet() for step in self._steps], producer=PRODUCER)}


def _unique(datasets: Iterable[InputDataset | OutputDataset]) -> list:
    """The datasets in order, each (namespace, name) once: its first occurrence."""
    kept: dict = {}
    for dataset in datasets:
        kept.setdefault((dataset.namespace, dataset.name), dataset)
    return list(kept.values())


