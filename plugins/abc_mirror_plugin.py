"""Airflow plugin: a "ABC releases" page in the Airflow UI and a small JSON API on the api-server.

``/abc-mirror/`` lists every release the warehouse knows (upstream seen, mirrored files in scope, loaded,
published, data-quality checks, last error) and the lag behind upstream, as ``abc-mirror status``
does; ``/abc-mirror/releases`` gives the same as JSON for dashboards and scripts. The page reads the
warehouse named by ``ABC_DATABASE_URL`` and the mirror ``ABC_MIRROR_ROOT`` of the api-server's
environment (docker-compose sets both). Like every FastAPI plugin app it is not behind Airflow's
authentication: it shows release status only, no data, and no write is possible through it.
"""

from __future__ import annotations

import html

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

URL_PREFIX = "/abc-mirror"

app = FastAPI(title="abc-mirror releases", description=__doc__)


def release_status() -> dict:
    """The status table and the lag, as plain JSON-able values."""
    from etl import db, monitor
    from etl.config import Settings
    from etl.mirror import target_name

    settings = Settings.from_env()
    engine = db.make_engine(settings.database_url)
    try:
        target = target_name(settings.mirror_root)
        releases = monitor.release_statuses(engine, target, settings.run_scope)
        lag = monitor.lag(engine)
    finally:
        engine.dispose()
    return {
        "mirror": target,
        "scope": settings.scope,
        "releases": [{"release": r.version, "status": r.status, "shares_data_with": r.shares_data_with,
                      "upstream_seen": _iso(r.discovered_at), "files": r.files, "files_ok": r.files_ok,
                      "files_failed": r.files_failed, "bytes": r.bytes, "bytes_ok": r.bytes_ok,
                      "loaded": _iso(r.loaded_at), "published": _iso(r.published_at), "checks": r.checks,
                      "last_error": r.last_error, "datasets": r.datasets}
                     for r in releases],
        "lag": {"newest_upstream": lag.newest_upstream, "newest_published": lag.newest_published,
                "behind_since": _iso(lag.behind_since), "hours": round(lag.hours(), 2)},
    }


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


@app.get("/releases")
def releases() -> dict:
    return release_status()


@app.get("/", response_class=HTMLResponse)
def page() -> str:
    status = release_status()
    columns = ["release", "status", "upstream_seen", "files_ok", "files_failed", "files", "loaded", "published",
               "checks", "last_error"]
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c] if r[c] is not None else '-'))}</td>"
                                    for c in columns) + "</tr>" for r in status["releases"])
    lag = status["lag"]
    behind = f"behind since {lag['behind_since']} ({lag['hours']} h)" if lag["behind_since"] else "up to date"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>ABC releases</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}</style></head><body>
<h1>ABC Atlas releases</h1><p>mirror {html.escape(status['mirror'])}; newest upstream
{html.escape(str(lag['newest_upstream']))}, newest published {html.escape(str(lag['newest_published']))}:
{html.escape(behind)}. <a href="releases">JSON</a></p>
<table><tr>{''.join(f'<th>{c.replace("_", " ")}</th>' for c in columns)}</tr>{body}</table></body></html>"""


class AbcMirrorPlugin(AirflowPlugin):
    name = "abc_mirror"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "abc-mirror releases"}]
    external_views = [{"name": "ABC releases", "href": f"{URL_PREFIX}/", "destination": "nav",
                       "url_route": "abc-releases", "category": "browse"}]
