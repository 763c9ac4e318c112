"""Talking to the source bucket: an anonymous boto3 client, listings and small reads.

The real bucket is public, so requests are unsigned unless configured otherwise; an endpoint
override (``AWS_ENDPOINT_URL_S3`` or ``--endpoint-url``) points the same code at a local
``rclone serve s3`` in tests and demos.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
from botocore import UNSIGNED
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from etl.config import Settings
from etl.manifest import DATE_RE

RELEASES_PREFIX = "releases/"
MANIFEST_NAME = "manifest.json"


class SourceUnreachable(RuntimeError):
    """The bucket could not be listed or read at all (network, endpoint, permissions)."""


def make_client(settings: Settings, max_pool_connections: int | None = None) -> BaseClient:
    """Build the S3 client used everywhere: unsigned by default, adaptive retries.

    Region, endpoint, credentials and extra botocore options come from ``settings`` (the environment,
    or the Airflow connection ``aws_default``: :func:`etl.config.source_from_aws_connection`); a signed
    client without credentials in ``settings`` finds them the way boto3 does.
    """
    config = Config(
        signature_version=UNSIGNED if settings.unsigned else None,
        retries={"max_attempts": 8, "mode": "adaptive"},
        max_pool_connections=max_pool_connections or max(10, settings.workers * 2),
        connect_timeout=10,
        read_timeout=60,
    )
    if settings.source_config:
        config = config.merge(Config(**settings.source_config))
    credentials = {} if settings.unsigned else {
        name: value for name, value in (("aws_access_key_id", settings.aws_access_key_id),
                                        ("aws_secret_access_key", settings.aws_secret_access_key),
                                        ("aws_session_token", settings.aws_session_token)) if value}
    return boto3.client(
        "s3", region_name=settings.region, endpoint_url=settings.endpoint_url, config=config, **credentials
    )


def _describe(settings: Settings) -> str:
    where = settings.endpoint_url or f"AWS ({settings.region})"
    return f"s3://{settings.bucket} at {where}"


def list_common_prefixes(client: BaseClient, bucket: str, prefix: str) -> list[str]:
    """Immediate sub-"directories" of ``prefix`` (each ending in ``/``)."""
    found: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        found.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
    return found


def list_objects(client: BaseClient, bucket: str, prefix: str) -> Iterator[dict]:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def _last_component(prefix: str) -> str:
    return prefix.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatedDirectory:
    """``<kind>/<dataset>/<YYYYMMDD>/`` as seen in the bucket listing."""

    kind: str
    dataset: str
    version: str

    @property
    def prefix(self) -> str:
        return f"{self.kind}/{self.dataset}/{self.version}/"


def list_release_versions(client: BaseClient, settings: Settings) -> list[str]:
    """Dated release directories under ``releases/``, oldest first."""
    try:
        prefixes = list_common_prefixes(client, settings.bucket, RELEASES_PREFIX)
    except (BotoCoreError, ClientError) as exc:
        raise SourceUnreachable(f"cannot list {RELEASES_PREFIX} in {_describe(settings)}: {exc}") from exc
    return sorted(v for v in map(_last_component, prefixes) if DATE_RE.match(v))


def list_dated_directories(client: BaseClient, settings: Settings) -> list[DatedDirectory]:
    """Every ``<kind>/<dataset>/<date>/`` directory in the bucket, whatever the kind."""
    found: list[DatedDirectory] = []
    try:
        for kind_prefix in list_common_prefixes(client, settings.bucket, ""):
            kind = _last_component(kind_prefix)
            if kind_prefix == RELEASES_PREFIX:
                continue
            for dataset_prefix in list_common_prefixes(client, settings.bucket, kind_prefix):
                dataset = _last_component(dataset_prefix)
                for version_prefix in list_common_prefixes(client, settings.bucket, dataset_prefix):
                    version = _last_component(version_prefix)
                    if DATE_RE.match(version):
                        found.append(DatedDirectory(kind, dataset, version))
    except (BotoCoreError, ClientError) as exc:
        raise SourceUnreachable(f"cannot list {_describe(settings)}: {exc}") from exc
    return sorted(found, key=lambda d: (d.kind, d.dataset, d.version))


@dataclass(frozen=True)
class FetchedObject:
    key: str
    body: bytes
    md5: str
    etag: str
    last_modified: str


def fetch_small_object(client: BaseClient, settings: Settings, key: str) -> FetchedObject:
    """Read a small object (a manifest) whole, with its MD5 computed from the bytes."""
    try:
        response = client.get_object(Bucket=settings.bucket, Key=key)
        body = response["Body"].read()
    except EndpointConnectionError as exc:
        raise SourceUnreachable(f"cannot read {key} from {_describe(settings)}: {exc}") from exc
    return FetchedObject(
        key=key,
        body=body,
        md5=hashlib.md5(body).hexdigest(),
        etag=response.get("ETag", "").strip('"'),
        last_modified=response["LastModified"].isoformat() if "LastModified" in response else "",
    )


def manifest_key(version: str) -> str:
    return f"{RELEASES_PREFIX}{version}/{MANIFEST_NAME}"
