"""All configuration in one place: environment variables with documented defaults.

In production under Airflow the same values come from connections (``aws_default``,
``abc_postgres``); the DAG layer turns those into a :class:`Settings` so that the library never
reads Airflow state itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from etl.scope import AUTO_FLOOR, DEFAULT_DATASET_PATTERNS, Scope

DEFAULT_BUCKET = "allen-brain-cell-atlas"
DEFAULT_REGION = "us-west-2"
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/abc"

# name -> (default, meaning). The README's configuration table lists each with its default, and no other
# ABC_ variable, beside the OpenLineage and Airflow ones it also documents (tests/test_config.py checks it).
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "ABC_DATABASE_URL": (DEFAULT_DATABASE_URL, "SQLAlchemy URL of the atlas warehouse"),
    "ABC_BUCKET": (DEFAULT_BUCKET, "source bucket"),
    "ABC_REGION": (DEFAULT_REGION, "source bucket region"),
    "AWS_ENDPOINT_URL_S3": ("", "S3 endpoint override (empty: AWS); honoured by boto3 too"),
    "ABC_S3_UNSIGNED": ("1", "1: anonymous (unsigned) requests to the source bucket"),
    "ABC_MIRROR_ROOT": ("./var/mirror", "local directory or s3://bucket/prefix of the mirror"),
    "ABC_WORKERS": ("16", "parallel transfers"),
    "ABC_WEBHOOK_URL": ("", "JSON webhook for alerts (empty: none)"),
    "ABC_MAX_LAG_HOURS": ("72", "alert when the newest published release trails upstream's for longer than this"),
    "ABC_SCOPE": ("consensus-mouse", "what scheduled runs take: consensus-mouse (the consensus datasets, their "
                  "WMB matrices and genes) or atlas (mirror every file listed; load the consensus part)"),
    "ABC_SCOPE_DATASETS": (",".join(DEFAULT_DATASET_PATTERNS), "comma-separated name patterns of the datasets the "
                           "warehouse loads"),
    "ABC_TRANSFER_RETRY_SECONDS": ("120", "a data GET that keeps failing (throttling, 5xx, dropped connections) "
                                   "is given up this long after it stopped making progress, or after the S3 "
                                   "client's attempts (botocore retries config, AWS_MAX_ATTEMPTS)"),
    "ABC_LOAD_CONNECTIONS": ("2", "metadata tables staged at once, each on its own PostgreSQL connection (COPY and "
                             "index builds run on one server core each)"),
    "ABC_STAGE_WAIT_SECONDS": ("900", "how long a run waits for another run staging the same release before it "
                               "fails, naming it"),
    "ABC_STAGE_OWNER": ("", "who a stage belongs to (empty: the Airflow DAG run, else user@host pid, whose stage "
                        "is abandoned once the process dies)"),
    "ABC_FIRST_RELEASE": (AUTO_FLOOR, "first release processed (YYYYMMDD); auto: the first whose manifest holds "
                          "the scope's datasets. Older ones are recorded as skipped"),
}


_URL_PASSWORD = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@]*?:)[^@/]*@")


def mask_password(url: str | None) -> str | None:
    """``url`` with the password of its user info shown as ``***`` (for logs and reprs)."""
    return _URL_PASSWORD.sub(r"\1***@", url) if url else url


def mask_webhook(url: str | None) -> str | None:
    """A webhook URL as ``scheme://host/***``: Slack-style webhook URLs carry their secret in the path."""
    if not url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"
    host = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}/***"


def _mask_secret(value: str | None) -> str | None:
    return "***" if value else value


def env(name: str) -> str:
    """A documented environment variable's value, or its default."""
    return os.environ.get(name, ENVIRONMENT[name][0])


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    bucket: str = DEFAULT_BUCKET
    region: str = DEFAULT_REGION
    endpoint_url: str | None = None
    unsigned: bool = True
    mirror_root: str = "./var/mirror"
    workers: int = 16
    webhook_url: str | None = None
    max_lag_hours: float = 72.0
    scope: str = "consensus-mouse"
    scope_datasets: tuple[str, ...] = DEFAULT_DATASET_PATTERNS
    first_release: str = AUTO_FLOOR
    # Source credentials and botocore Config options, from the Airflow connection aws_default (none from
    # the environment: a signed client then finds credentials the way boto3 does).
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    source_config: dict = field(default_factory=dict, hash=False)

    def __repr__(self) -> str:
        """Every field, with the database password and the webhook URL masked (both are secrets)."""
        masked = {"database_url": mask_password, "webhook_url": mask_webhook,
                  "aws_secret_access_key": _mask_secret, "aws_session_token": _mask_secret}
        shown = ", ".join(f"{f.name}={masked.get(f.name, lambda v: v)(getattr(self, f.name))!r}"
                          for f in fields(self))
        return f"Settings({shown})"

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            database_url=env("ABC_DATABASE_URL"),
            bucket=env("ABC_BUCKET"),
            region=env("ABC_REGION"),
            endpoint_url=env("AWS_ENDPOINT_URL_S3") or None,
            unsigned=env("ABC_S3_UNSIGNED").lower() not in ("0", "false", "no"),
            mirror_root=env("ABC_MIRROR_ROOT"),
            workers=int(env("ABC_WORKERS")),
            webhook_url=env("ABC_WEBHOOK_URL") or None,
            max_lag_hours=float(env("ABC_MAX_LAG_HOURS")),
            scope=env("ABC_SCOPE"),
            scope_datasets=tuple(env("ABC_SCOPE_DATASETS").split(",")),
            first_release=env("ABC_FIRST_RELEASE"),
        )

    def with_overrides(self, **overrides: object) -> Settings:
        """Apply CLI flags that were given (``None`` means: keep the configured value)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def run_scope(self) -> Scope:
        """The configured scope; raises :class:`etl.scope.ScopeError` for an unknown name."""
        return Scope.named(self.scope, self.scope_datasets)

    @property
    def mirror_is_local(self) -> bool:
        return not self.mirror_root.startswith("s3://")

    @property
    def mirror_path(self) -> Path:
        return Path(self.mirror_root).resolve()


def target_name(mirror_root: str) -> str:
    """How a target is named in the records: a resolved directory, or ``s3://bucket/prefix``."""
    return mirror_root.rstrip("/") if mirror_root.startswith("s3://") else str(Path(mirror_root).resolve())


def settings_for_airflow_task() -> Settings:
    """Settings inside an Airflow task: the environment, overridden by Airflow connections.

    Production configures the warehouse as connection ``abc_postgres`` and the source as
    ``aws_default`` (see :func:`source_from_aws_connection`); where a connection is not defined, the
    environment variables above apply, so tests and the demo need none.
    """
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    settings = Settings.from_env()
    try:
        warehouse = Connection.get("abc_postgres")
        # etl.db runs any PostgreSQL URL on psycopg 3; SQLAlchemy only needs the dialect's name spelt out.
        settings = settings.with_overrides(database_url=warehouse.get_uri().replace("postgres://", "postgresql://", 1))
    except AirflowNotFoundException:
        pass
    try:
        aws = Connection.get("aws_default")
    except AirflowNotFoundException:
        return settings
    return source_from_aws_connection(settings, aws)


def source_from_aws_connection(settings: Settings, connection: object) -> Settings:
    """``settings`` with the source bucket's client configured by an Airflow AWS connection.

    Read as the amazon provider's hooks read it (``AwsConnectionWrapper``, what ``AwsBaseHook.conn_config``
    returns): region (extra ``region_name``), endpoint (extra ``endpoint_url`` or
    ``service_config.s3.endpoint_url``), credentials (login/password or extra ``aws_access_key_id``,
    ``aws_secret_access_key``, ``aws_session_token``) and extra ``config_kwargs`` (botocore ``Config``
    options; ``signature_version: unsigned`` for anonymous requests). Requests are unsigned when
    ``config_kwargs`` says so, signed when it names another signature or the connection carries
    credentials, else as ``ABC_S3_UNSIGNED`` says. What the connection leaves out keeps the
    environment's value. Profiles and assumed roles are not read: use boto3's environment for those.
    """
    from airflow.providers.amazon.aws.utils.connection_wrapper import AwsConnectionWrapper

    aws = AwsConnectionWrapper(conn=connection)
    config = dict(aws.extra_config.get("config_kwargs") or {})
    signature = config.pop("signature_version", None)
    keys = bool(aws.aws_access_key_id and aws.aws_secret_access_key)
    if signature is not None and signature != "unsigned":
        config["signature_version"] = signature
    unsigned = signature == "unsigned" if signature is not None else (False if keys else settings.unsigned)
    return replace(settings, region=aws.region_name or settings.region,
                   endpoint_url=aws.get_service_endpoint_url("s3") or settings.endpoint_url, unsigned=unsigned,
                   aws_access_key_id=aws.aws_access_key_id if keys else None,
                   aws_secret_access_key=aws.aws_secret_access_key if keys else None,
                   aws_session_token=aws.aws_session_token if keys else None, source_config=config)
