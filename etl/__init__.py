"""abc-mirror's library: one module a job, data flowing one way (bucket -> mirror -> warehouse); the map is
docs/architecture.md. Usable without Airflow: the DAGs in dags/ only wire ``etl.pipeline`` into tasks."""
