"""Alerts: a JSON POST to a webhook (``ABC_WEBHOOK_URL``), recorded in ``abc.alert``.

Kinds: ``new_release`` (upstream published a release), ``published`` (this mirror published one),
``failed_run`` (a step or task failed), ``failed_check`` (a data-quality check failed after a load),
``lag`` (the newest published release is older than upstream's by more than the allowed time).
Sending never raises: a webhook that is down, slow or answers an error is logged as a warning and
recorded as not delivered, so an alert can never crash the run it reports on. The Airflow
notifier in ``plugins/abc_notifiers.py`` calls :func:`send` from task and DAG callbacks.

Body: ``{"source": "abc-mirror", "kind": ..., "release": ..., "summary": ..., "details": {...},
"sent_at": ISO time}``.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.config import mask_webhook

log = logging.getLogger(__name__)

KINDS = ("new_release", "published", "failed_run", "failed_check", "lag")
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Alert:
    kind: str
    summary: str
    release: str | None = None
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"alert kind {self.kind!r}: one of {', '.join(KINDS)}")

    def payload(self) -> dict:
        return {"source": "abc-mirror", "kind": self.kind, "release": self.release, "summary": self.summary,
                "details": self.details, "sent_at": datetime.now(UTC).isoformat()}


def post_json(url: str, payload: dict, timeout: float = TIMEOUT_S) -> bool:
    """POST ``payload`` as JSON; True when the webhook answered 2xx. Never raises."""
    request = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "abc-mirror"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("webhook %s did not take the %s alert: %s", mask_webhook(url), payload.get("kind"),
                    str(exc).replace(url, mask_webhook(url)))
        return False


def send(alert: Alert, webhook_url: str | None, engine: Engine | None = None) -> bool:
    """Post the alert (when a webhook is configured) and record it; True if delivered."""
    payload = alert.payload()
    delivered = post_json(webhook_url, payload) if webhook_url else False
    if not webhook_url:
        log.warning("alert (no webhook configured): %s", alert.summary)
    if engine is not None:
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO abc.alert (kind, release, summary, payload, delivered) "
                                     "VALUES (:k, :r, :s, :p, :d)"),
                             {"k": alert.kind, "r": alert.release, "s": alert.summary,
                              "p": json.dumps(payload, default=str), "d": delivered})
        except sa.exc.SQLAlchemyError as exc:
            log.warning("alert %s not recorded in abc.alert: %s", alert.summary, exc)
    return delivered


def already_sent(engine: Engine, kind: str, release: str | None, details: dict | None = None,
                 delivered: bool = True) -> bool:
    """Whether a ``kind`` alert about ``release`` (None: about no release) was recorded (delivered, unless
    ``delivered`` is False).

    ``details`` narrows it to alerts whose details hold these values (e.g. the ``published_at`` of one
    publication), so that a step retried or cleared sends its alert once per state of the release.
    """
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT EXISTS (SELECT 1 FROM abc.alert WHERE kind = :k AND release IS NOT DISTINCT FROM CAST(:r AS text) "
            "AND (delivered OR NOT :delivered) AND payload -> 'details' @> CAST(:d AS jsonb))"),
            {"k": kind, "r": release, "delivered": delivered,
             "d": json.dumps(details or {}, default=str)}).scalar_one()


def send_once(alert: Alert, webhook_url: str | None, engine: Engine, state: dict) -> bool | None:
    """Send ``alert`` unless one of its kind about its release with ``state`` in its details was sent already.

    ``state`` (a subset of ``alert.details``) names the state of the release the alert is about, so a
    task retried or cleared, or a check run again, alerts once per state: not again once delivered,
    not recorded twice when no webhook is configured, tried again when the webhook did not take it.
    When the record cannot be read (the warehouse is down: often why a task failed) the alert is sent:
    a repeated alert is better than a lost one. Returns whether it was delivered, None when not sent.
    """
    if any(alert.details.get(name) != value for name, value in state.items()):
        raise ValueError(f"alert state {state} is not part of the alert's details")
    try:
        sent = already_sent(engine, alert.kind, alert.release, state, delivered=bool(webhook_url))
    except sa.exc.SQLAlchemyError as exc:
        log.warning("alert %s: could not read abc.alert (%s); sending it", alert.summary, exc)
        sent = False
    if sent:
        log.info("alert %s already sent for %s", alert.summary, json.dumps(state, default=str))
        return None
    return send(alert, webhook_url, engine)
