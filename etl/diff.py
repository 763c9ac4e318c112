"""Release diffs: what changed between two releases, per dataset, stored and rendered as release notes.

Files are compared by what they are, not by key: a file is identified by (dataset, kind, tag,
normalization, file type), because a release that pins a new dated directory gives every file of
it a new key. So a file is *added* or *removed* when its identity appears or disappears, *changed*
when its MD5 differs, and *moved* when only its key changed (same MD5). Directories (the dated
version each dataset/kind is pinned to), cells (added, removed, re-assigned to another cluster),
clusters and genes are compared by their labels. The core works on DataFrames, so it is testable
without a database; :func:`release_content` reads them from the warehouse (the staged load of a
release when it is not yet published, so the diff can be stored at load time).
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Engine

from etl import db
from etl.publish import staged_or_published
from etl.scope import Scope
from etl.transfer import write_file_nofollow

FILE_IDENTITY = ["dataset", "kind", "tag", "normalization", "file_type"]
ITEM_COLUMNS = ["dataset", "subject", "change", "item", "old_value", "new_value"]
LISTED_PER_CHANGE = 50


@dataclass
class ReleaseContent:
    """What a diff compares of one release; every frame has a ``dataset`` column."""

    release: str
    files: pd.DataFrame  # relative_path, dataset, kind, tag, normalization, file_type, md5
    directories: pd.DataFrame  # dataset, kind, version
    cells: pd.DataFrame  # dataset, cell_label, cluster_alias
    clusters: pd.DataFrame  # dataset, cluster_alias
    genes: pd.DataFrame  # dataset, gene_identifier
    cluster_class: pd.DataFrame  # cluster_alias, class_name


@dataclass
class ReleaseDiff:
    old: str
    new: str
    items: pd.DataFrame  # ITEM_COLUMNS
    cells_per_class: pd.DataFrame  # class_name, old, new

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """dataset -> subject -> change -> number of items."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (dataset, subject, change), n in self.items.groupby(["dataset", "subject", "change"]).size().items():
            out.setdefault(dataset, {}).setdefault(subject, {})[change] = int(n)
        return out

    def count(self, subject: str, change: str, dataset: str | None = None) -> int:
        rows = self.items[(self.items.subject == subject) & (self.items.change == change)]
        return int(len(rows if dataset is None else rows[rows.dataset == dataset]))


def _items(frame: pd.DataFrame, subject: str, change: str, item: str, old: str | None, new: str | None) -> pd.DataFrame:
    return pd.DataFrame({"dataset": frame["dataset"].to_numpy(), "subject": subject, "change": change,
                         "item": frame[item].astype(str).to_numpy(),
                         "old_value": frame[old].astype(str).to_numpy() if old else None,
                         "new_value": frame[new].astype(str).to_numpy() if new else None}, columns=ITEM_COLUMNS)


def _outer(old: pd.DataFrame, new: pd.DataFrame, on: list[str]) -> pd.DataFrame:
    return old.merge(new, on=on, how="outer", suffixes=("_old", "_new"), indicator=True)


def diff_files(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    both = _outer(old[[*FILE_IDENTITY, "relative_path", "md5"]], new[[*FILE_IDENTITY, "relative_path", "md5"]],
                  FILE_IDENTITY)
    kept = both[both._merge == "both"]
    return pd.concat([
        _items(both[both._merge == "right_only"], "file", "added", "relative_path_new", None, "md5_new"),
        _items(both[both._merge == "left_only"], "file", "removed", "relative_path_old", "md5_old", None),
        _items(kept[kept.md5_old != kept.md5_new], "file", "changed", "relative_path_new", "md5_old", "md5_new"),
        _items(kept[(kept.md5_old == kept.md5_new) & (kept.relative_path_old != kept.relative_path_new)],
               "file", "moved", "relative_path_new", "relative_path_old", "relative_path_new"),
    ], ignore_index=True)


def diff_directories(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    both = _outer(old, new, ["dataset", "kind"])
    kept = both[both._merge == "both"]
    return pd.concat([
        _items(both[both._merge == "right_only"], "directory", "added", "kind", None, "version_new"),
        _items(both[both._merge == "left_only"], "directory", "removed", "kind", "version_old", None),
        _items(kept[kept.version_old != kept.version_new], "directory", "changed", "kind", "version_old",
               "version_new"),
    ], ignore_index=True)


def diff_cells(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Cells added, removed, and re-assigned to another cluster (``cluster_alias`` old -> new)."""
    both = _outer(old[["dataset", "cell_label", "cluster_alias"]], new[["dataset", "cell_label", "cluster_alias"]],
                  ["dataset", "cell_label"])
    kept = both[both._merge == "both"]
    moved = kept[kept.cluster_alias_old.astype("Int64").ne(kept.cluster_alias_new.astype("Int64")).fillna(
        kept.cluster_alias_old.isna() != kept.cluster_alias_new.isna())]
    return pd.concat([
        _items(both[both._merge == "right_only"], "cell", "added", "cell_label", None, "cluster_alias_new"),
        _items(both[both._merge == "left_only"], "cell", "removed", "cell_label", "cluster_alias_old", None),
        _items(moved, "cell", "reassigned", "cell_label", "cluster_alias_old", "cluster_alias_new"),
    ], ignore_index=True)


def diff_labels(old: pd.DataFrame, new: pd.DataFrame, subject: str, key: str) -> pd.DataFrame:
    """Labels (clusters, genes) added and removed per dataset."""
    both = _outer(old[["dataset", key]].drop_duplicates(), new[["dataset", key]].drop_duplicates(), ["dataset", key])
    return pd.concat([_items(both[both._merge == "right_only"], subject, "added", key, None, None),
                      _items(both[both._merge == "left_only"], subject, "removed", key, None, None)],
                     ignore_index=True)


def cells_per_class(cells: pd.DataFrame, cluster_class: pd.DataFrame) -> pd.Series:
    named = cells.merge(cluster_class, on="cluster_alias", how="left")
    return named["class_name"].fillna("(no class)").value_counts()


def diff(old: ReleaseContent, new: ReleaseContent) -> ReleaseDiff:
    items = pd.concat([
        diff_files(old.files, new.files),
        diff_directories(old.directories, new.directories),
        diff_cells(old.cells, new.cells),
        diff_labels(old.clusters, new.clusters, "cluster", "cluster_alias"),
        diff_labels(old.genes, new.genes, "gene", "gene_identifier"),
    ], ignore_index=True)
    per_class = pd.DataFrame({"old": cells_per_class(old.cells, old.cluster_class),
                              "new": cells_per_class(new.cells, new.cluster_class)}).fillna(0).astype(int)
    per_class = per_class.rename_axis("class_name").reset_index().sort_values("class_name", ignore_index=True)
    return ReleaseDiff(old.release, new.release, items, per_class)


# --- from the warehouse -----------------------------------------------------------------------

def _frame(conn: psycopg.Connection, query: sql.Composable, dtypes: dict[str, str]) -> pd.DataFrame:
    buffer = io.BytesIO()
    with conn.cursor().copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT csv, HEADER true)").format(query)) as copy:
        for data in copy:
            buffer.write(data)
    buffer.seek(0)
    return pd.read_csv(buffer, dtype=dtypes, keep_default_na=False, na_values=[""])


def release_content(database_url: str, release: str, scope: Scope) -> ReleaseContent:
    """A release's files and directories that feed the warehouse in ``scope`` (manifest), and its loaded
    cells, clusters and genes (those of the release it shares when published by reference)."""
    def rows(table: str, columns: str) -> sql.Composed:
        return sql.SQL("SELECT {} FROM {} WHERE release = {}").format(
            sql.SQL(columns), staged_or_published(conn, table, data), sql.Literal(data))

    text = str
    with db.copy_connection(database_url) as conn:
        data = conn.execute("SELECT coalesce(shares_data_with, version) FROM abc.release WHERE version = %s",
                            (release,)).fetchone()
        data = data[0] if data else release
        files = _frame(conn, sql.SQL("SELECT relative_path, dataset, kind, tag, normalization, file_type, md5 "
                                     "FROM abc.release_file WHERE release = {}").format(sql.Literal(release)),
                       dict.fromkeys(["relative_path", *FILE_IDENTITY, "md5"], text))
        files = files[[scope.feeds_warehouse(f) for f in files.itertuples()]].reset_index(drop=True)
        files["normalization"] = files["normalization"].fillna("")
        directories = _frame(conn, sql.SQL("SELECT dataset, kind, version FROM abc.release_directory "
                                           "WHERE release = {}").format(sql.Literal(release)),
                             dict.fromkeys(["dataset", "kind", "version"], text))
        scoped = set(zip(files["dataset"], files["kind"], strict=True))
        directories = directories[[(d, k) in scoped for d, k in zip(directories["dataset"], directories["kind"],
                                                                      strict=True)]].reset_index(drop=True)
        # A cell's cluster is its own cluster_alias or, in the consensus layout, the taxonomy's
        # cell_to_cluster_membership row.
        cells = _frame(conn, sql.SQL(
            "SELECT c.dataset, c.cell_label, coalesce(c.cluster_alias, m.cluster_alias) AS cluster_alias "
            "FROM {} c LEFT JOIN {} m ON m.release = c.release AND m.cell_label = c.cell_label "
            "WHERE c.release = {}").format(
            staged_or_published(conn, "cell", data),
            staged_or_published(conn, "cell_cluster_membership", data), sql.Literal(data)),
            {"dataset": text, "cell_label": text, "cluster_alias": "Int64"})
        clusters = _frame(conn, rows("cluster", "dataset, cluster_alias"), {"dataset": text, "cluster_alias": "Int64"})
        genes = _frame(conn, rows("gene", "dataset, gene_identifier"), {"dataset": text, "gene_identifier": text})
        cluster_class = _frame(conn, rows("cluster_membership", "cluster_alias, cluster_annotation_term_name AS "
                                          "class_name") + sql.SQL(" AND cluster_annotation_term_set_name = 'class'"),
                               {"cluster_alias": "Int64", "class_name": text})
    return ReleaseContent(release, files, directories, cells, clusters, genes, cluster_class)


def store(database_url: str, result: ReleaseDiff) -> None:
    """Replace the stored diff of (old, new): summary counts in abc.release_diff, items via COPY."""
    with db.copy_connection(database_url) as conn, conn.transaction():
        conn.execute("DELETE FROM abc.release_diff WHERE old_release = %s AND new_release = %s",
                     (result.old, result.new))
        conn.execute("INSERT INTO abc.release_diff (old_release, new_release, summary) VALUES (%s, %s, %s)",
                     (result.old, result.new, json.dumps(result.counts())))
        with conn.cursor().copy("COPY abc.release_diff_item (old_release, new_release, dataset, subject, change, "
                                "item, old_value, new_value) FROM STDIN") as copy:
            for row in result.items.itertuples(index=False):
                copy.write_row((result.old, result.new, row.dataset, row.subject, row.change, row.item,
                                row.old_value, row.new_value))


def previous_release(engine: Engine, release: str) -> str | None:
    """The newest release older than ``release`` whose metadata is loaded (the one to diff against)."""
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT max(version) FROM abc.release WHERE version < :r "
                                    "AND status IN ('loaded', 'published') "), {"r": release}).scalar()


# --- release notes ----------------------------------------------------------------------------

CHANGES = ["added", "removed", "changed", "moved", "reassigned"]
SUBJECTS = ["directory", "file", "cell", "cluster", "gene"]


def _summary_rows(result: ReleaseDiff) -> list[list[str]]:
    counts = result.counts()
    return [[dataset, subject, *(str(counts[dataset].get(subject, {}).get(c, 0)) for c in CHANGES)]
            for dataset in sorted(counts) for subject in SUBJECTS if subject in counts[dataset]]


def _listed(result: ReleaseDiff, subject: str) -> list[tuple[str, str, str]]:
    """(change, item, detail) of ``subject``, at most LISTED_PER_CHANGE per change."""
    out = []
    for change in CHANGES:
        rows = result.items[(result.items.subject == subject) & (result.items.change == change)]
        for row in rows.sort_values(["dataset", "item"]).head(LISTED_PER_CHANGE).itertuples():
            old, new = row.old_value, row.new_value
            detail = f"{old} → {new}" if old and new else (new or old or "")
            out.append((change, f"{row.dataset}: {row.item}", detail))
        if len(rows) > LISTED_PER_CHANGE:
            out.append((change, f"… and {len(rows) - LISTED_PER_CHANGE} more", ""))
    return out


def release_notes_markdown(result: ReleaseDiff) -> str:
    lines = [f"# Release {result.new}: changes since {result.old}", "", "## Summary", "",
             "| dataset | subject | " + " | ".join(CHANGES) + " |", "|---|---|" + "---:|" * len(CHANGES)]
    lines += ["| " + " | ".join(row) + " |" for row in _summary_rows(result)]
    if result.items.empty:
        lines += ["", "No change in scope."]
    for subject, title in (("directory", "Dataset versions"), ("file", "Files")):
        listed = _listed(result, subject)
        if listed:
            lines += ["", f"## {title}", ""] + [f"- {change}: `{item}` {detail}".rstrip() for change, item, detail
                                                in listed]
    lines += ["", "## Cells per class", "", f"| class | {result.old} | {result.new} | change |", "|---|---:|---:|---:|"]
    lines += [f"| {r.class_name} | {r.old} | {r.new} | {r.new - r.old:+d} |"
              for r in result.cells_per_class.itertuples()]
    return "\n".join(lines) + "\n"


def cells_per_class_svg(result: ReleaseDiff, bar_height: int = 8, width: int = 640) -> str:
    """A grouped horizontal bar chart, old vs new cells per class, as inline SVG (no script, works offline)."""
    frame = result.cells_per_class
    label_width, row = 220, 2 * bar_height + 8
    top = max([1, *frame.old.tolist(), *frame.new.tolist()])
    scale = (width - label_width - 60) / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row * len(frame) + 40}" '
             f'role="img" aria-label="cells per class, {result.old} vs {result.new}" font-family="sans-serif" '
             'font-size="11">',
             f'<rect x="{label_width}" y="4" width="10" height="10" fill="#9aa5b1"/>'
             f'<text x="{label_width + 14}" y="13">{result.old}</text>'
             f'<rect x="{label_width + 90}" y="4" width="10" height="10" fill="#2f6fde"/>'
             f'<text x="{label_width + 104}" y="13">{result.new}</text>']
    for i, r in enumerate(frame.itertuples()):
        y = 24 + i * row
        parts.append(f'<text x="{label_width - 6}" y="{y + bar_height + 3}" text-anchor="end">'
                     f'{html.escape(str(r.class_name))}</text>')
        for j, (value, color) in enumerate(((r.old, "#9aa5b1"), (r.new, "#2f6fde"))):
            yy = y + j * bar_height
            parts.append(f'<rect class="{"old" if j == 0 else "new"}" x="{label_width}" y="{yy}" '
                         f'width="{value * scale:.1f}" height="{bar_height - 1}" fill="{color}">'
                         f'<title>{html.escape(str(r.class_name))}: {value}</title></rect>'
                         f'<text x="{label_width + value * scale + 4:.1f}" y="{yy + bar_height - 1}">{value}</text>')
    parts.append("</svg>")
    return "".join(parts)


def release_notes_html(result: ReleaseDiff) -> str:
    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    title = f"Release {result.new}: changes since {result.old}"
    sections = [f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>",
                table(["dataset", "subject", *CHANGES], _summary_rows(result)) if not result.items.empty
                else "<p>No change in scope.</p>"]
    for subject, name in (("directory", "Dataset versions"), ("file", "Files")):
        listed = _listed(result, subject)
        if listed:
            sections += [f"<h2>{name}</h2>", table(["change", "item", "detail"], [list(x) for x in listed])]
    sections += ["<h2>Cells per class</h2>", cells_per_class_svg(result),
                 table(["class", result.old, result.new, "change"],
                       [[r.class_name, r.old, r.new, f"{r.new - r.old:+d}"]
                        for r in result.cells_per_class.itertuples()])]
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")


def write_release_notes(result: ReleaseDiff, mirror_root: Path) -> tuple[Path, Path]:
    """``<mirror_root>/releases/<new>/release-notes.md`` and ``.html``, each written whole (temp file + rename)."""
    directory = Path(mirror_root) / "releases" / result.new
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in ((".md", release_notes_markdown(result)), (".html", release_notes_html(result))):
        path = directory / f"release-notes{suffix}"
        partial = path.with_name(path.name + ".partial")
        write_file_nofollow(partial, text.encode("utf-8"))  # a symlink planted there is refused, not followed
        partial.replace(path)
        written.append(path)
    return written[0], written[1]
