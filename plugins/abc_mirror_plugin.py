"""Airflow plugin: the "ABC releases" page in the Airflow UI, and its JSON, on the api-server.

``/abc-mirror/`` shows every release the warehouse knows, newest first: the state of each stage
(upstream, mirror, load, expression, checks, publish) and of each dataset (published, mirrored only,
not in scope, skipped ...), sizes in human units, times as "3 h ago", the lag behind upstream, links
to the Airflow DAG runs that worked on the release (the UI's ``dags/<dag_id>/runs/<run_id>``), to its
release notes and its lineage, and a chart of the cells per class across published releases. The
data is :func:`etl.overview.overview`; this module only renders it, as one self-contained document
(inline CSS, the chart as server-side SVG, no script, nothing fetched from elsewhere) with every value
escaped. Links are relative to the page, so they hold under an api-server base URL with a path.

``/abc-mirror/releases`` gives the data as JSON, ``/abc-mirror/releases/<release>/notes`` the release
notes written beside the mirror, ``/abc-mirror/releases/<release>/lineage`` the release's lineage runs
as JSON. The page reads the warehouse named by ``ABC_DATABASE_URL`` and the mirror ``ABC_MIRROR_ROOT``
of the api-server's environment (docker-compose sets both). Like every FastAPI plugin app it is not
behind Airflow's authentication: it shows release status, notes and lineage only, no data, and no
write is possible through it.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Annotated
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse
from sqlalchemy.engine import Engine

if TYPE_CHECKING:  # etl is imported when a page is asked for, not by every Airflow component loading plugins
    from etl.config import Settings
    from etl.overview import Overview, ReleaseOverview

URL_PREFIX = "/abc-mirror"
# Nothing but inline styles and the page's own links: no script runs, nothing is fetched.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
Release = Annotated[str, PathParam(pattern=r"^[0-9]{8}$", description="release version YYYYMMDD")]

app = FastAPI(title="abc-mirror releases", description=__doc__)


@contextmanager
def _warehouse() -> Iterator[tuple[Engine, Settings]]:
    from etl import db
    from etl.config import Settings

    settings = Settings.from_env()
    engine = db.make_engine(settings.database_url)
    try:
        yield engine, settings
    finally:
        engine.dispose()


def _overview() -> Overview:
    from etl import overview
    from etl.config import target_name

    with _warehouse() as (engine, settings):
        return overview.overview(engine, target_name(settings.mirror_root), settings.run_scope,
                                 settings.mirror_path if settings.mirror_is_local else None)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@app.get("/releases")
def releases() -> dict:
    """Every release (oldest first) with its stages, datasets, DAG runs and lineage; cells per class; the lag."""
    view = _overview()
    return {
        "mirror": view.mirror,
        "scope": view.scope,
        "releases": [{"release": r.version, "status": r.status, "shares_data_with": r.shares_data_with,
                      "upstream_seen": _iso(r.discovered_at), "files": r.files, "files_ok": r.files_ok,
                      "files_failed": r.files_failed, "bytes": r.bytes, "bytes_ok": r.bytes_ok,
                      "loaded": _iso(r.loaded_at), "published": _iso(r.published_at), "checks": r.checks,
                      "last_error": r.last_error, "datasets": r.datasets,
                      "stages": {s.name: {"state": s.state, "detail": s.detail, "at": _iso(s.at)} for s in o.stages},
                      "dag_runs": [{"dag_id": d.dag_id, "run_id": d.run_id, "started_at": _iso(d.started_at),
                                    "steps": list(d.steps), "failed": d.failed} for d in o.dag_runs],
                      "lineage_runs": o.lineage_runs, "release_notes": o.has_notes}
                     for o in view.releases for r in [o.status]],
        "cells_per_class": {"releases": view.cells_per_class.releases,
                            "classes": dict(view.cells_per_class.classes)},
        "lag": {"newest_upstream": view.lag.newest_upstream, "newest_published": view.lag.newest_published,
                "behind_since": _iso(view.lag.behind_since), "hours": round(view.lag.hours(view.now), 2)},
    }


@app.get("/releases/{release}/notes", response_class=HTMLResponse)
def release_notes(release: Release) -> HTMLResponse:
    """The release notes written beside the mirror (the diff against the previous loaded release)."""
    from etl import diff
    from etl.config import Settings
    from etl.manifest import UnsafeKeyError
    from etl.transfer import SymlinkRefusedError

    settings = Settings.from_env()
    try:
        notes = diff.read_release_notes(settings.mirror_path, release) if settings.mirror_is_local else None
    except (UnsafeKeyError, SymlinkRefusedError) as exc:
        raise HTTPException(403, str(exc)) from None
    if notes is None:
        raise HTTPException(404, f"no release notes of {release} beside the mirror {settings.mirror_root}")
    return HTMLResponse(notes, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})


@app.get("/releases/{release}/lineage")
def release_lineage(release: Release) -> list[dict]:
    """The release's lineage runs: each step, who ran it, its standing, what it read and wrote."""
    from etl import lineage_report

    with _warehouse() as (engine, _):
        runs = lineage_report.release_runs(engine, release)
    if runs is None:
        raise HTTPException(404, f"release {release} is not recorded")
    return runs


@app.get("/", response_class=HTMLResponse)
def page() -> HTMLResponse:
    return HTMLResponse(render_page(_overview()), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})


# --- the page ---------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#1d2125}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.1em;margin:1.5em 0 .5em}
.summary{margin:.2em 0 1em} .lag{padding:.15em .5em;border-radius:3px}
.lag.ok{background:#d8f3dc} .lag.behind{background:#ffe3b3}
table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #d5d9dd;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f1f3f5}
.stage{font-size:.85em;min-width:7em} .state{font-weight:600;display:block}
.done{background:#e3f6e8} .partial{background:#fff4c2} .running{background:#dbeeff}
.failed{background:#ffdede} .waiting{background:#fff} .skipped{background:#f1f3f5;color:#6b7278}
.mirrored{background:#e7e9fb}
.badge{display:inline-block;padding:0 .4em;border-radius:3px;font-size:.85em}
details{margin:.1em 0} summary{cursor:pointer} .names{font-size:.85em;color:#444;max-width:22em}
.error{color:#a61b1b;font-size:.85em;max-width:20em;overflow-wrap:anywhere}
ul.links{margin:0;padding-left:1.1em;font-size:.85em}
.muted{color:#6b7278;font-size:.85em}
"""


def render_page(view: Overview) -> str:
    """The releases page of ``view`` (an :class:`etl.overview.Overview`): one self-contained HTML document."""
    from etl.diff import cells_per_class_svg
    from etl.overview import STAGES, duration

    e = html.escape
    lag = view.lag
    newest = f"newest upstream {e(str(lag.newest_upstream))}, newest published {e(str(lag.newest_published or '-'))}"
    if lag.newest_upstream is None:
        lag_html = '<span class="lag behind">no release recorded yet</span>'
    elif lag.behind_since:
        lag_html = (f'<span class="lag behind" title="since {e(_iso(lag.behind_since))}">behind upstream for '
                    f"{e(duration(view.now - lag.behind_since))}: {newest}</span>")
    else:
        lag_html = f'<span class="lag ok">up to date: {newest}</span>'
    head = "".join(f"<th>{e(name)}</th>" for name in ["release", *STAGES, "datasets", "links", "last error"])
    rows = "".join(_release_row(o, view.now) for o in reversed(view.releases))
    chart = view.cells_per_class
    chart_html = (cells_per_class_svg(chart.releases, chart.classes, bar_height=12) if chart.classes
                  else '<p class="muted">No published release has cells yet.</p>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ABC releases</title><style>{STYLE}</style></head>
<body>
<h1>ABC Atlas releases</h1>
<p class="summary">Mirror <code>{e(view.mirror)}</code>, scope <code>{e(view.scope)}</code>. {lag_html}.
<a href="releases">JSON</a></p>
<table id="releases"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
<h2>Cells per class across published releases</h2>
<div id="cells-per-class">{chart_html}</div>
<p class="muted">As of {e(f"{view.now:%Y-%m-%d %H:%M:%S %Z}")}; newest release first.</p>
</body></html>
"""


def _release_row(o: ReleaseOverview, now: datetime) -> str:
    from etl.overview import ago

    e, r = html.escape, o.status
    shared = f'<div class="muted">shares {e(r.shares_data_with)}</div>' if r.shares_data_with else ""
    cells = [f'<td><strong>{e(r.version)}</strong> <span class="badge {_status_class(r.status)}">{e(r.status)}'
             f"</span>{shared}</td>"]
    for s in o.stages:
        title = f' title="{e(_iso(s.at))}"' if s.at else ""
        cells.append(f'<td class="stage {e(s.state)}"{title}><span class="state">{e(s.state)}</span>'
                     f"{e(s.detail)}</td>")
    datasets = "".join(
        f'<details><summary><span class="badge {_status_class(state)}">{e(state)}: {len(names)}</span></summary>'
        f'<div class="names">{e(", ".join(names))}</div></details>' for state, names in sorted(r.datasets.items()))
    cells.append(f"<td>{datasets or '-'}</td>")
    links = [f'<li><a href="../dags/{quote(d.dag_id, safe="")}/runs/{quote(d.run_id, safe="")}" target="_top" '
             f'title="{e(", ".join(d.steps))}">{e(d.dag_id)} {e(d.run_id)}</a> {e(ago(d.started_at, now))}'
             + (f' <span class="badge failed">{d.failed} failed</span>' if d.failed else "") + "</li>"
             for d in o.dag_runs]
    if o.has_notes:
        links.append(f'<li><a href="releases/{e(r.version)}/notes">release notes</a></li>')
    if o.lineage_runs:
        runs = f"{o.lineage_runs} run" + ("s" if o.lineage_runs > 1 else "")
        links.append(f'<li><a href="releases/{e(r.version)}/lineage">lineage: {runs}</a></li>')
    cells.append(f'<td><ul class="links">{"".join(links)}</ul></td>' if links else "<td>-</td>")
    error = r.last_error or ""
    cells.append(f'<td class="error" title="{e(error)}">{e(error[:200])}</td>')
    return f'<tr data-release="{e(r.version)}">{"".join(cells)}</tr>'


def _status_class(state: str) -> str:
    """The colour of a release's or a dataset's state (etl.monitor.dataset_states)."""
    if state.startswith("published") or state == "loaded":
        return "done"
    if state == "mirrored, not loaded":
        return "mirrored"
    if state in ("partly mirrored", "mirroring", "loading"):
        return "partial"
    return {"failed": "failed", "skipped": "skipped", "not in scope": "skipped"}.get(state, "waiting")


class AbcMirrorPlugin(AirflowPlugin):
    name = "abc_mirror"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "abc-mirror releases"}]
    external_views = [{"name": "ABC releases", "href": f"{URL_PREFIX}/", "destination": "nav",
                       "url_route": "abc-releases", "category": "browse"}]
