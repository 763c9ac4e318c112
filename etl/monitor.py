"""Release monitoring: status of every release and of the mirror, lag behind upstream, and the alerts.

- :func:`release_status_lines`: one table of every release (upstream seen, mirrored files ok/failed
  and bytes, loaded, published, checks, last error) and the lag: newest upstream vs newest published;
  :func:`mirror_status_lines`: each release's files verified in a mirror target and its last run.
- :func:`check_release`, :func:`check_lag`, :func:`announce_new_releases`, :func:`record_diff`:
  the monitoring DAG's (and the load step's) units of work, each alerting through ``etl.alerts``.
  The checks themselves, and the gate that refuses to publish, are :mod:`etl.quality`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl import db
from etl.alerts import Alert, already_sent, send, send_once
from etl.catalog import MAX_LISTED
from etl.config import Settings
from etl.publish import read_state
from etl.quality import CheckResult, run_quality_checks
from etl.scope import Scope

log = logging.getLogger(__name__)


def check_release(settings: Settings, engine: Engine, release: str) -> list[CheckResult]:
    """Run and store the checks of ``release``; alert when any failed, once per state checked (a run's
    stage or the publication) and failures found, however often the check runs again."""
    results = run_quality_checks(engine, release)
    failed = [r for r in results if not r.passed]
    if failed:
        with db.copy_connection(settings.database_url) as conn:
            checked = read_state(conn, release)
        state = {"checked": checked,
                 "checks": [{"name": r.name, "failing": r.failing, "details": r.details} for r in failed]}
        send_once(Alert("failed_check", f"release {release}: {len(failed)} data-quality check(s) failed: "
                        + ", ".join(r.name for r in failed), release, state), settings.webhook_url, engine, state)
    return results


@dataclass(frozen=True)
class Lag:
    newest_upstream: str | None
    newest_published: str | None
    behind_since: datetime | None  # when the oldest unpublished newer release was seen upstream

    def hours(self, now: datetime | None = None) -> float:
        if self.behind_since is None:
            return 0.0
        return ((now or datetime.now(UTC)) - self.behind_since).total_seconds() / 3600

    def summary(self, max_lag_hours: float) -> dict:
        return {"newest_upstream": self.newest_upstream, "newest_published": self.newest_published,
                "lag_hours": round(self.hours(), 2), "max_lag_hours": max_lag_hours}


def lag(engine: Engine) -> Lag:
    with engine.connect() as conn:
        row = conn.execute(sa.text("""
            SELECT (SELECT max(version) FROM abc.release) AS upstream,
                   (SELECT release FROM abc.current_release) AS published,
                   (SELECT min(discovered_at) FROM abc.release WHERE status <> 'skipped' AND version > coalesce(
                        (SELECT release FROM abc.current_release), '')) AS since""")).one()
    return Lag(row.upstream, row.published, row.since)


def check_lag(settings: Settings, engine: Engine, now: datetime | None = None) -> Lag:
    """Alert when the mirror's newest published release has trailed upstream's for over ``max_lag_hours``:
    once per pair of newest upstream and newest published release, not at every check while it lasts."""
    current = lag(engine)
    hours = current.hours(now)
    if hours > settings.max_lag_hours:
        state = {"newest_upstream": current.newest_upstream, "newest_published": current.newest_published}
        send_once(Alert("lag", f"newest published release {current.newest_published or '(none)'} trails upstream "
                        f"{current.newest_upstream} for {hours:.1f} h (allowed {settings.max_lag_hours:g} h)",
                        current.newest_upstream,
                        {**state, "behind_since": current.behind_since, "lag_hours": round(hours, 2),
                         "max_lag_hours": settings.max_lag_hours}),
                  settings.webhook_url, engine, state)
    return current


def announce_new_releases(settings: Settings, engine: Engine) -> list[str]:
    """Alert each recorded release that was not announced yet (delivered); returns those announced now."""
    if not settings.webhook_url:
        log.info("no webhook configured (ABC_WEBHOOK_URL): new releases not announced")
        return []
    with engine.connect() as conn:
        releases = conn.execute(sa.text("SELECT version, n_files, total_bytes, manifest_key FROM abc.release "
                                        "WHERE status <> 'skipped' ORDER BY version")).all()
    announced = []
    for r in releases:
        if already_sent(engine, "new_release", r.version):
            continue
        if send(Alert("new_release", f"new upstream release {r.version}: {r.n_files} files, {r.total_bytes} bytes",
                      r.version, {"manifest_key": r.manifest_key, "n_files": r.n_files,
                                  "total_bytes": r.total_bytes}), settings.webhook_url, engine):
            announced.append(r.version)
    return announced


def record_diff(settings: Settings, engine: Engine, release: str, old: str | None = None) -> tuple[Path, Path] | None:
    """Diff ``release`` against ``old`` (default: the previous loaded release), store it, write release notes.

    Release notes go beside a local mirror (``<mirror_root>/releases/<release>/``); returns their
    paths, or None when there is no earlier release or the mirror is not a local directory.
    """
    from etl import diff

    old = old or diff.previous_release(engine, release)
    if old is None:
        log.info("release %s: no earlier loaded release to diff against", release)
        return None
    result = diff.record(engine, old, release, settings.run_scope)
    if not settings.mirror_is_local:
        log.info("release notes of %s not written: mirror %s is not a local directory", release, settings.mirror_root)
        return None
    return diff.write_release_notes(result, settings.mirror_path)


@dataclass(frozen=True)
class ReleaseStatus:
    """One release as ``abc-mirror status`` and the releases page show it: its own state, and its files
    in the scope (the manifest lists the whole atlas) with how many ``target`` holds verified."""

    version: str
    status: str
    shares_data_with: str | None
    discovered_at: datetime | None
    loaded_at: datetime | None
    published_at: datetime | None
    last_error: str | None
    checks: str  # passed/run, "-" when none ran
    files_failed: int  # in the last mirror run to the target
    files: int
    files_ok: int
    bytes: int
    bytes_ok: int
    datasets: dict[str, list[str]]  # state -> datasets (:func:`dataset_states`)


def release_statuses(engine: Engine, target: str, scope: Scope) -> list[ReleaseStatus]:
    """Every recorded release, oldest first, with its files in ``scope`` and their state in ``target``."""
    with engine.connect() as conn:
        releases = conn.execute(sa.text("""
            SELECT r.version, r.status, r.shares_data_with, r.discovered_at, r.loaded_at, r.published_at,
                   r.last_error,
                   (SELECT files_failed FROM abc.mirror_run m WHERE m.release = r.version AND m.target = :t
                    ORDER BY started_at DESC, id DESC LIMIT 1) AS files_failed,
                   (SELECT count(*) FILTER (WHERE passed) || '/' || count(*) FROM abc.quality_check q
                    WHERE q.release = r.version) AS checks
            FROM abc.release r ORDER BY r.version"""), {"t": target}).all()
    files = _release_files(engine, target)
    scoped: dict[str, list[sa.Row]] = {}
    for f in files:
        if scope.mirrors(f):
            scoped.setdefault(f.release, []).append(f)
    states = dataset_states(files, scope)
    out = []
    for r in releases:
        mine = scoped.get(r.version, [])
        out.append(ReleaseStatus(
            r.version, r.status, r.shares_data_with, r.discovered_at, r.loaded_at, r.published_at, r.last_error,
            r.checks if r.checks != "0/0" else "-", r.files_failed or 0, len(mine), sum(f.ok for f in mine),
            sum(f.size for f in mine), sum(f.size for f in mine if f.ok), states.get(r.version, {})))
    return out


def _release_files(engine: Engine, target: str) -> list[sa.Row]:
    """Every file of every recorded release, with its release's state and whether ``target`` holds it verified."""
    with engine.connect() as conn:
        return conn.execute(sa.text("""
            SELECT rf.release, r.status, r.shares_data_with, rf.dataset, rf.kind, rf.tag, rf.size,
                   o.relative_path IS NOT NULL AS ok
            FROM abc.release_file rf JOIN abc.release r ON r.version = rf.release
            LEFT JOIN abc.mirror_object o ON o.target = :t AND o.relative_path = rf.relative_path
                AND o.md5 = rf.md5 AND o.size = rf.size"""), {"t": target}).all()


def dataset_states(files: list[sa.Row], scope: Scope) -> dict[str, dict[str, list[str]]]:
    """release -> state -> datasets: what happened to each dataset a release lists, in ``scope``.

    States: ``skipped`` (release before the history floor), ``not in scope``, ``not mirrored`` and
    ``partly mirrored`` (none or some of its scoped files verified in the target), ``mirrored, not
    loaded`` (no loader: mirrored only), and for the datasets feeding the warehouse the release's own
    state (``published``, ``published by reference``, ``loaded``, ``mirrored`` ...). ``files`` are
    :func:`_release_files` rows.
    """
    by_dataset: dict[tuple[str, str], list[sa.Row]] = {}
    for row in files:
        by_dataset.setdefault((row.release, row.dataset), []).append(row)
    states: dict[str, dict[str, list[str]]] = {}
    for (release, dataset), listed in sorted(by_dataset.items()):
        first, scoped = listed[0], [f for f in listed if scope.mirrors(f)]
        if first.status == "skipped":
            state = "skipped"
        elif not scoped:
            state = "not in scope"
        elif not any(f.ok for f in scoped):
            state = "not mirrored"
        elif not all(f.ok for f in scoped):
            state = "partly mirrored"
        elif not any(scope.feeds_warehouse(f) for f in scoped):
            state = "mirrored, not loaded"
        elif first.shares_data_with:
            state = f"published by reference (data of {first.shares_data_with})"
        else:
            state = first.status
        states.setdefault(release, {}).setdefault(state, []).append(dataset)
    return states


def release_status_lines(engine: Engine, target: str, scope: Scope, now: datetime | None = None) -> list[str]:
    """``abc-mirror status``: every release in one table (its files in ``scope``), the lag behind upstream,
    then each dataset's state."""
    releases = release_statuses(engine, target, scope)
    if not releases:
        return ["no release recorded: run `abc-mirror discover` first"]

    def when(value: datetime | None) -> str:
        return f"{value:%Y-%m-%d %H:%M}" if value else "-"

    header = ["release", "status", "upstream seen", "in scope: mirrored ok/failed/of", "bytes ok", "loaded",
              "published", "checks", "last error"]
    table = [[r.version, f"{r.status} (= {r.shares_data_with})" if r.shares_data_with else r.status,
              when(r.discovered_at), f"{r.files_ok}/{r.files_failed}/{r.files}", human_size(r.bytes_ok),
              when(r.loaded_at), when(r.published_at), r.checks, (r.last_error or "")[:60]] for r in releases]
    widths = [max(len(str(x[i])) for x in [header, *table]) for i in range(len(header))]
    out = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in [header, *table]]
    out.insert(1, "  ".join("-" * w for w in widths))
    current = lag(engine)
    hours = current.hours(now)
    out.append(f"lag: newest upstream {current.newest_upstream}, newest published {current.newest_published or '-'}"
               + (f", behind for {hours:.1f} h" if current.behind_since else ", up to date"))
    out.append(f"datasets per release (scope {scope.name}):")
    for r in releases:
        if r.datasets:
            out.append(f"  {r.version}:")
        for state, datasets in sorted(r.datasets.items()):
            shown = ", ".join(datasets) if len(datasets) <= 6 else f"{len(datasets)} datasets"
            out.append(f"    {state}: {shown}")
    return out


def human_size(n: float) -> str:
    """Bytes in decimal units: "512 B", "3.2 MB", "1.4 TB"."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000



def releases_to_check(engine: Engine) -> list[str]:
    """Loaded or published releases whose last load is newer than their last quality checks (a release
    published by reference has no rows of its own to check)."""
    with engine.connect() as conn:
        return conn.execute(sa.text("""
            SELECT version FROM abc.release r WHERE status IN ('loaded', 'published') AND shares_data_with IS NULL
              AND NOT EXISTS (SELECT 1 FROM abc.quality_check q WHERE q.release = r.version
                              AND q.checked_at >= coalesce(r.loaded_at, r.published_at))
            ORDER BY version""")).scalars().all()


def releases_without_diff(engine: Engine) -> list[tuple[str, str]]:
    """(previous, release) pairs of loaded or published releases whose diff is not stored yet."""
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text("""
            SELECT prev.version, r.version FROM abc.release r
            CROSS JOIN LATERAL (SELECT max(p.version) AS version FROM abc.release p
                                WHERE p.version < r.version AND p.status IN ('loaded', 'published')) prev
            WHERE r.status IN ('loaded', 'published') AND prev.version IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM abc.release_diff d WHERE d.old_release = prev.version
                              AND d.new_release = r.version)
            ORDER BY r.version""")).all()]


def mirror_status_lines(engine: Engine, target: str, release: str | None = None) -> list[str]:
    """``abc-mirror status``: each release's mirror status in ``target`` and its last run's integrity report."""
    query = """
        SELECT r.version, r.status, r.mirrored_at, r.last_error, r.n_files, r.total_bytes,
               count(o.relative_path) AS verified, coalesce(sum(o.size), 0) AS verified_bytes
        FROM abc.release r
        LEFT JOIN abc.release_file rf ON rf.release = r.version
        LEFT JOIN abc.mirror_object o ON o.target = :t AND o.relative_path = rf.relative_path
            AND o.md5 = rf.md5 AND o.size = rf.size
        WHERE (CAST(:r AS text) IS NULL OR r.version = :r)
        GROUP BY r.version ORDER BY r.version"""
    last_run = """
        SELECT started_at, finished_at, status, files_selected, files_ok, files_fetched, files_skipped,
               files_failed, bytes_fetched, failures
        FROM abc.mirror_run WHERE release = :r AND target = :t ORDER BY started_at DESC, id DESC LIMIT 1"""
    out = [f"mirror target {target}"]
    with engine.connect() as conn:
        releases = conn.execute(sa.text(query), {"t": target, "r": release}).all()
        for rel in releases:
            out.append(f"release {rel.version}: {rel.status}"
                       + (f" (mirrored at {rel.mirrored_at:%Y-%m-%d %H:%M:%S %Z})" if rel.mirrored_at else "")
                       + f"; {rel.verified} of the manifest's {rel.n_files} files verified here "
                       f"({rel.verified_bytes} of {rel.total_bytes} bytes; the table above counts the scope)")
            run = conn.execute(sa.text(last_run), {"r": rel.version, "t": target}).first()
            if run is not None:
                out.append(f"  last run {run.started_at:%Y-%m-%d %H:%M:%S}: {run.status}; {run.files_selected} "
                           f"selected, ok {run.files_ok}, fetched {run.files_fetched}, skipped {run.files_skipped}, "
                           f"failed {run.files_failed}, {run.bytes_fetched} bytes fetched")
                out += [f"  FAILED {key}: {why}" for key, why in sorted(run.failures.items())[:MAX_LISTED]]
            if rel.last_error:
                out.append(f"  last error: {rel.last_error}")
    if not releases:
        out.append(f"no release {release} recorded" if release else "no release recorded: run discover first")
    return out


# The monitoring DAG's tasks: settings in, a summary out.

def announce(settings: Settings) -> list[str]:
    """:func:`announce_new_releases`, on an engine of its own."""
    with db.disposing_engine(settings.database_url) as engine:
        return announce_new_releases(settings, engine)


def check_loaded_releases(settings: Settings) -> dict[str, list[str]]:
    """:func:`check_release` for every release to check: release -> the checks that failed."""
    with db.disposing_engine(settings.database_url) as engine:
        return {release: [r.name for r in check_release(settings, engine, release) if not r.passed]
                for release in releases_to_check(engine)}


def diff_releases(settings: Settings) -> dict[str, str | None]:
    """:func:`record_diff` for every published release without one: release -> its notes' path."""
    written = {}
    with db.disposing_engine(settings.database_url) as engine:
        for old, new in releases_without_diff(engine):
            notes = record_diff(settings, engine, new, old)
            written[new] = str(notes[0]) if notes else None
    return written


def lag_report(settings: Settings) -> dict:
    """:func:`check_lag` (alerting when due), as a summary."""
    with db.disposing_engine(settings.database_url) as engine:
        return check_lag(settings, engine).summary(settings.max_lag_hours)
