"""``@lineage_task``: a TaskFlow task whose OpenLineage events carry what its abc-mirror steps read and wrote.

Airflow's OpenLineage provider sends every task's START and COMPLETE (or FAIL) through the transport
the deployment configures once for all DAGs (``[openlineage] transport``, i.e.
``AIRFLOW__OPENLINEAGE__TRANSPORT``). A task declared with ``@lineage_task`` instead of ``@task``
runs its ``etl.lineage`` steps within ``lineage.reported_by_task()``: they record themselves in
PostgreSQL as ever and emit nothing of their own, and the provider asks the operator for their
datasets and facets (``get_openlineage_facets_on_complete``, also called on failure), the way it
asks any operator implementing the OpenLineage methods.
"""

from __future__ import annotations

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory


class LineageDecoratedOperator(DecoratedOperator, PythonOperator):
    """``@task``'s operator, reporting the lineage of the steps its callable runs."""

    template_fields = ("templates_dict", "op_args", "op_kwargs")
    custom_operator_name = "@lineage_task"

    def __init__(self, *, python_callable, op_args, op_kwargs, **kwargs) -> None:
        super().__init__(kwargs_to_upstream={"python_callable": python_callable, "op_args": op_args,
                                             "op_kwargs": op_kwargs},
                         python_callable=python_callable, op_args=op_args, op_kwargs=op_kwargs, **kwargs)
        self.step_lineage = None

    def execute(self, context):
        from etl import lineage

        with lineage.reported_by_task() as self.step_lineage:
            return super().execute(context)

    def get_openlineage_facets_on_complete(self, task_instance):
        """The steps' inputs (bucket keys, tables read), outputs (tables and the partitions written) and facets."""
        from airflow.providers.openlineage.extractors import OperatorLineage

        if self.step_lineage is None:
            return OperatorLineage()
        return OperatorLineage(inputs=self.step_lineage.inputs(), outputs=self.step_lineage.outputs(),
                               run_facets=self.step_lineage.run_facets())


def lineage_task(python_callable=None, multiple_outputs: bool | None = None, **kwargs):
    """``@task`` for a task running ``etl.lineage`` steps (``@lineage_task``, ``@lineage_task(pool=...)``)."""
    return task_decorator_factory(python_callable=python_callable, multiple_outputs=multiple_outputs,
                                  decorated_operator_class=LineageDecoratedOperator, **kwargs)
