"""Release diffs: what changed between two releases, per dataset, stored and rendered as release notes.

Files are compared by what they are, not by key: a file is identified by (dataset, kind, tag,
normalization, file type), because a release that pins a new dated directory gives every file of
it a new key. So a file is *added* or *removed* when its identity appears or disappears, *changed*
when its MD5 differs, and *moved* when only its key changed (same MD5). Directories (the dated
version each dataset/kind is pinned to), cells (added, removed, re-assigned to another cluster),
clusters and genes are compared by their labels.

The diff is computed in the database, so that no memory proportional to the cells is needed:
each comparison is an ``INSERT ... SELECT`` (a full join of the two releases' rows) straight into
``abc.release_diff_item``; the cells are compared in one pass that also counts them per cluster
of each release (so per class), and the summary counts are a ``GROUP BY`` of the items. Only the
scope's file filter runs in Python (a release lists a few thousand files). Rows are read from the
staged load of a release when it is not yet published (:func:`etl.publish.staged_or_published`),
so the diff can be stored at load time, and from the release it shares when published by
reference. The release notes read the counts and at most ``LISTED_PER_CHANGE`` items of each
change.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.rows import namedtuple_row
from sqlalchemy.engine import Engine

from etl import db
from etl.catalog import LocalRoot
from etl.publish import staged_or_published
from etl.scope import Scope
from etl.transfer import open_nofollow, write_file_nofollow

LISTED_PER_CHANGE = 50
CHANGES = ["added", "removed", "changed", "moved", "reassigned"]
SUBJECTS = ["directory", "file", "cell", "cluster", "gene"]
LISTED_SUBJECTS = ["directory", "file"]  # the release notes list these items; the others are counted
NO_CLASS = "(no class)"


@dataclass(frozen=True)
class DiffItem:
    dataset: str
    subject: str
    change: str
    item: str
    old_value: str | None
    new_value: str | None


@dataclass(frozen=True)
class ClassCount:
    class_name: str
    old: int
    new: int


@dataclass
class ReleaseDiff:
    """A stored diff as the release notes need it: counts, a few items, cells per class."""

    old: str
    new: str
    summary: dict[str, dict[str, dict[str, int]]]  # dataset -> subject -> change -> number of items
    listed: list[DiffItem]  # of LISTED_SUBJECTS, the first LISTED_PER_CHANGE of each change by (dataset, item)
    cells_per_class: list[ClassCount]  # sorted by class name

    def count(self, subject: str, change: str, dataset: str | None = None) -> int:
        return sum(by_subject.get(subject, {}).get(change, 0) for name, by_subject in self.summary.items()
                   if dataset is None or name == dataset)


# --- in the database ----------------------------------------------------------------------------

# Each statement inserts the items of one subject (the cells' also returns the cells per class);
# %(old)s / %(new)s are the releases compared, %(old_data)s / %(new_data)s the releases whose rows
# they read (their own, or those they share), {old_*} / {new_*} those rows' relations (staged or
# published).
_INSERT = "INSERT INTO abc.release_diff_item (old_release, new_release, dataset, subject, change, item, " \
          "old_value, new_value) "

_FILES = _INSERT + """
    SELECT %(old)s, %(new)s, dataset, 'file', change, coalesce(n.relative_path, o.relative_path),
           CASE WHEN change = 'moved' THEN o.relative_path ELSE o.md5 END,
           CASE WHEN change = 'moved' THEN n.relative_path ELSE n.md5 END
    FROM (SELECT * FROM abc.release_file WHERE release = %(old)s AND relative_path = ANY(%(old_files)s)) o
    FULL JOIN (SELECT * FROM abc.release_file WHERE release = %(new)s AND relative_path = ANY(%(new_files)s)) n
        USING (dataset, kind, tag, normalization, file_type)
    CROSS JOIN LATERAL (SELECT CASE WHEN o.relative_path IS NULL THEN 'added'
                                    WHEN n.relative_path IS NULL THEN 'removed'
                                    WHEN o.md5 <> n.md5 THEN 'changed' ELSE 'moved' END AS change) c
    WHERE o.relative_path IS NULL OR n.relative_path IS NULL OR o.md5 <> n.md5 OR o.relative_path <> n.relative_path"""

# A release's directories of the datasets and kinds its scoped files are in.
_SCOPED_DIRECTORIES = """(SELECT dataset, kind, version FROM abc.release_directory d WHERE release = %({r})s
    AND EXISTS (SELECT 1 FROM abc.release_file f WHERE f.release = d.release AND f.dataset = d.dataset
                AND f.kind = d.kind AND f.relative_path = ANY(%({r}_files)s)))"""

_DIRECTORIES = _INSERT + f"""
    SELECT %(old)s, %(new)s, dataset, 'directory',
           CASE WHEN o.version IS NULL THEN 'added' WHEN n.version IS NULL THEN 'removed' ELSE 'changed' END,
           kind, o.version, n.version
    FROM {_SCOPED_DIRECTORIES.format(r="old")} o FULL JOIN {_SCOPED_DIRECTORIES.format(r="new")} n USING (dataset, kind)
    WHERE o.version IS DISTINCT FROM n.version"""

# Labels (clusters, genes) added and removed per dataset.
_LABELS = _INSERT + """
    SELECT %(old)s, %(new)s, coalesce(n.dataset, o.dataset), {subject},
           CASE WHEN o.label IS NULL THEN 'added' ELSE 'removed' END, coalesce(n.label, o.label)::text, NULL, NULL
    FROM (SELECT DISTINCT dataset, {column} AS label FROM {{old_{table}}} WHERE release = %(old_data)s) o
    FULL JOIN (SELECT DISTINCT dataset, {column} AS label FROM {{new_{table}}} WHERE release = %(new_data)s) n
        ON n.dataset = o.dataset AND n.label = o.label
    WHERE o.label IS NULL OR n.label IS NULL"""

# A release's cells with their cluster: its own cluster_alias or, in the consensus layout, the
# taxonomy's cell_to_cluster_membership row.
_CELLS_OF = """(SELECT c.dataset, c.cell_label, coalesce(c.cluster_alias, m.cluster_alias) AS cluster_alias
    FROM {{{r}_cell}} c LEFT JOIN {{{r}_cell_cluster_membership}} m ON m.release = c.release
         AND m.cell_label = c.cell_label
    WHERE c.release = %({r}_data)s)"""

# Cells per class of each side, from the cells counted per (side, cluster) in per_cluster: the
# few clusters are named by their side's 'class' term.
_PER_CLASS = """
    SELECT p.side, coalesce(t.cluster_annotation_term_name, %(no_class)s), sum(p.n)::bigint
    FROM per_cluster p LEFT JOIN (
        SELECT 'old' AS side, cluster_alias, cluster_annotation_term_name FROM {old_cluster_membership}
        WHERE release = %(old_data)s AND cluster_annotation_term_set_name = 'class'
        UNION ALL
        SELECT 'new', cluster_alias, cluster_annotation_term_name FROM {new_cluster_membership}
        WHERE release = %(new_data)s AND cluster_annotation_term_set_name = 'class') t
      ON t.side = p.side AND t.cluster_alias = p.cluster_alias
    GROUP BY 1, 2"""

# One pass over both releases' cells, joined on cell_label (unique in a release): it inserts the
# cell items and returns the cells per class of both sides. Unchanged cells collapse into one group
# per cluster, so ``pairs`` holds about as many rows as clusters plus changed cells. A changed cell
# in one release only is added or removed; in both, it is re-assigned within its dataset, or removed
# from its old dataset and added to its new one.
_CELLS = f"""
    WITH pairs AS (
        SELECT o.dataset AS old_dataset, n.dataset AS new_dataset, o.cluster_alias AS old_cluster,
               n.cluster_alias AS new_cluster,
               CASE WHEN o.dataset IS DISTINCT FROM n.dataset OR o.cluster_alias IS DISTINCT FROM n.cluster_alias
                    THEN coalesce(n.cell_label, o.cell_label) END AS changed_cell,
               count(*) AS n
        FROM {_CELLS_OF.format(r="old")} o FULL JOIN {_CELLS_OF.format(r="new")} n ON n.cell_label = o.cell_label
        GROUP BY 1, 2, 3, 4, 5),
    items AS ({_INSERT}
        SELECT %(old)s, %(new)s, x.dataset, 'cell', x.change, p.changed_cell, x.old_cluster::text,
               x.new_cluster::text
        FROM pairs p CROSS JOIN LATERAL (VALUES ('removed', p.old_dataset, p.old_cluster, NULL::integer),
                                                 ('added', p.new_dataset, NULL, p.new_cluster),
                                                 ('reassigned', p.new_dataset, p.old_cluster, p.new_cluster))
                                         x(change, dataset, old_cluster, new_cluster)
        WHERE p.changed_cell IS NOT NULL AND x.dataset IS NOT NULL
          AND (x.change = 'reassigned') = coalesce(p.old_dataset = p.new_dataset, false)),
    per_cluster AS (
        SELECT 'old' AS side, old_cluster AS cluster_alias, sum(n) AS n FROM pairs WHERE old_dataset IS NOT NULL
        GROUP BY 2
        UNION ALL
        SELECT 'new', new_cluster, sum(n) FROM pairs WHERE new_dataset IS NOT NULL GROUP BY 2)
    {_PER_CLASS}"""

# The same counts when both releases read the same rows (one shared by reference): no cell changed.
_SAME_CELLS = f"""
    WITH counts AS (SELECT cluster_alias, count(*) AS n FROM {_CELLS_OF.format(r="old")} o GROUP BY 1),
    per_cluster AS (SELECT side, cluster_alias, n FROM counts CROSS JOIN (VALUES ('old'), ('new')) s(side))
    {_PER_CLASS}"""

_ROW_TABLES = ["cell", "cell_cluster_membership", "cluster", "gene", "cluster_membership"]


def data_release(conn: psycopg.Connection, release: str) -> str:
    """The release whose rows ``release`` reads: the one it shares when published by reference, else itself."""
    row = conn.execute("SELECT coalesce(shares_data_with, version) FROM abc.release WHERE version = %s",
                       (release,)).fetchone()
    return row[0] if row else release


def scoped_files(conn: psycopg.Connection, release: str, scope: Scope) -> list[str]:
    """Keys of the release's files that feed the warehouse in ``scope`` (its manifest's, a few thousand)."""
    with conn.cursor(row_factory=namedtuple_row) as cursor:
        rows = cursor.execute("SELECT relative_path, dataset, kind, tag FROM abc.release_file WHERE release = %s",
                              (release,)).fetchall()
    return [r.relative_path for r in rows if scope.feeds_warehouse(r)]


@dataclass(frozen=True)
class DiffQueries:
    """The statements of a diff (to run, or EXPLAIN) and their parameters."""

    items: dict[str, sql.Composed]  # subject -> its INSERT ... SELECT of items (files, directories, labels)
    cells: sql.Composed  # inserts the cell items, returns (side, class name, cells)
    params: dict[str, object]


def queries(conn: psycopg.Connection, old: str, new: str, scope: Scope) -> DiffQueries:
    """The diff of (old, new) as statements over their staged or published rows.

    A release shared by reference has the very same rows as the one it shares: when both read the
    same rows, only files and directories are compared, and the cells are only counted.
    """
    params = {"old": old, "new": new, "old_data": data_release(conn, old), "new_data": data_release(conn, new),
              "old_files": scoped_files(conn, old, scope), "new_files": scoped_files(conn, new, scope),
              "no_class": NO_CLASS}
    same_rows = params["old_data"] == params["new_data"]
    items = {"file": _FILES, "directory": _DIRECTORIES}
    if not same_rows:
        items.update(cluster=_LABELS.format(subject="'cluster'", column="cluster_alias", table="cluster"),
                     gene=_LABELS.format(subject="'gene'", column="gene_identifier", table="gene"))
    relations = {f"{side}_{t}": staged_or_published(conn, t, params[f"{side}_data"])
                 for side in ("old", "new") for t in _ROW_TABLES}
    return DiffQueries({subject: sql.SQL(s).format(**relations) for subject, s in items.items()},
                       sql.SQL(_SAME_CELLS if same_rows else _CELLS).format(**relations), params)


def compute(conn: psycopg.Connection, old: str, new: str, scope: Scope) -> ReleaseDiff:
    """Replace the stored diff of (old, new) in ``conn``'s transaction (commit or roll back is the caller's),
    and read back what the release notes show."""
    planned = queries(conn, old, new, scope)
    conn.execute("INSERT INTO abc.release_diff (old_release, new_release, summary) VALUES (%s, %s, '{}') "
                 "ON CONFLICT (old_release, new_release) DO UPDATE SET computed_at = now(), summary = '{}'",
                 (old, new))
    conn.execute("DELETE FROM abc.release_diff_item WHERE old_release = %s AND new_release = %s", (old, new))
    for statement in planned.items.values():
        conn.execute(statement, planned.params)
    classes: dict[str, dict[str, int]] = {"old": {}, "new": {}}
    for side, name, n in conn.execute(planned.cells, planned.params).fetchall():
        classes[side][name] = n

    summary: dict[str, dict[str, dict[str, int]]] = {}
    for dataset, subject, change, n in conn.execute(
            "SELECT dataset, subject, change, count(*) FROM abc.release_diff_item WHERE old_release = %s "
            "AND new_release = %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", (old, new)).fetchall():
        summary.setdefault(dataset, {}).setdefault(subject, {})[change] = n
    conn.execute("UPDATE abc.release_diff SET summary = %s WHERE old_release = %s AND new_release = %s",
                 (json.dumps(summary), old, new))
    listed = [DiffItem(*row) for row in conn.execute(
        'SELECT dataset, subject, change, item, old_value, new_value FROM ('
        ' SELECT *, row_number() OVER (PARTITION BY subject, change ORDER BY dataset COLLATE "C", item COLLATE "C")'
        ' FROM abc.release_diff_item WHERE old_release = %s AND new_release = %s AND subject = ANY(%s)) i '
        'WHERE row_number <= %s ORDER BY subject, change, row_number',
        (old, new, LISTED_SUBJECTS, LISTED_PER_CHANGE)).fetchall()]
    per_class = [ClassCount(name, classes["old"].get(name, 0), classes["new"].get(name, 0))
                 for name in sorted(classes["old"].keys() | classes["new"].keys())]
    return ReleaseDiff(old, new, summary, listed, per_class)


def record(engine: Engine, old: str, new: str, scope: Scope, keep: bool = True) -> ReleaseDiff:
    """Compute and store the diff of (old, new); with ``keep`` False nothing stays stored (rolled back)."""
    with db.copy_connection(engine.url) as conn, conn.transaction(force_rollback=not keep):
        return compute(conn, old, new, scope)


def previous_release(engine: Engine, release: str) -> str | None:
    """The newest release older than ``release`` whose metadata is loaded (the one to diff against)."""
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT max(version) FROM abc.release WHERE version < :r "
                                    "AND status IN ('loaded', 'published') "), {"r": release}).scalar()


# --- release notes ----------------------------------------------------------------------------


def _summary_rows(result: ReleaseDiff) -> list[list[str]]:
    counts = result.summary
    return [[dataset, subject, *(str(counts[dataset].get(subject, {}).get(c, 0)) for c in CHANGES)]
            for dataset in sorted(counts) for subject in SUBJECTS if subject in counts[dataset]]


def _listed(result: ReleaseDiff, subject: str) -> list[tuple[str, str, str]]:
    """(change, item, detail) of ``subject``, at most LISTED_PER_CHANGE per change."""
    out = []
    for change in CHANGES:
        for row in (i for i in result.listed if i.subject == subject and i.change == change):
            old, new = row.old_value, row.new_value
            detail = f"{old} → {new}" if old and new else (new or old or "")
            out.append((change, f"{row.dataset}: {row.item}", detail))
        total = result.count(subject, change)
        if total > LISTED_PER_CHANGE:
            out.append((change, f"… and {total - LISTED_PER_CHANGE} more", ""))
    return out


def release_notes_markdown(result: ReleaseDiff) -> str:
    lines = [f"# Release {result.new}: changes since {result.old}", "", "## Summary", "",
             "| dataset | subject | " + " | ".join(CHANGES) + " |", "|---|---|" + "---:|" * len(CHANGES)]
    lines += ["| " + " | ".join(row) + " |" for row in _summary_rows(result)]
    if not result.summary:
        lines += ["", "No change in scope."]
    for subject, title in (("directory", "Dataset versions"), ("file", "Files")):
        listed = _listed(result, subject)
        if listed:
            lines += ["", f"## {title}", ""] + [f"- {change}: `{item}` {detail}".rstrip() for change, item, detail
                                                in listed]
    lines += ["", "## Cells per class", "", f"| class | {result.old} | {result.new} | change |", "|---|---:|---:|---:|"]
    lines += [f"| {r.class_name} | {r.old} | {r.new} | {r.new - r.old:+d} |"
              for r in result.cells_per_class]
    return "\n".join(lines) + "\n"


# Bars of the oldest release are grey, those of the newest blue, those between in between.
OLDEST_COLOUR, NEWEST_COLOUR = (0x9a, 0xa5, 0xb1), (0x2f, 0x6f, 0xde)


def release_colours(n: int) -> list[str]:
    """``n`` colours from the oldest release's to the newest's (the newest's alone for one)."""
    steps = [i / (n - 1) for i in range(n)] if n > 1 else [1.0]
    return ["#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(OLDEST_COLOUR, NEWEST_COLOUR, strict=True))
            for t in steps]


def cells_per_class_svg(releases: Sequence[str], classes: Sequence[tuple[str, Sequence[int]]], bar_height: int = 8,
                        width: int = 640) -> str:
    """Cells per class as grouped horizontal bars, one bar per release in each class's group, as inline SVG
    (no script, works offline). ``classes``: (class name, cells in each of ``releases``). Each bar is a
    ``<rect class="bar" data-release=...>``."""
    label_width, row, legend_step = 220, len(releases) * bar_height + 8, 90
    per_line = max(1, (width - label_width) // legend_step)
    top_margin = 8 + 16 * -(-len(releases) // per_line)
    top = max([1, *(n for _, counts in classes for n in counts)])
    scale = (width - label_width - 60) / top
    colours = release_colours(len(releases))
    label = html.escape(f"cells per class in {', '.join(releases)}")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top_margin + row * len(classes) + 8}" '
             f'role="img" aria-label="{label}" font-family="sans-serif" font-size="11">']
    for i, (release, colour) in enumerate(zip(releases, colours, strict=True)):
        x, y = label_width + (i % per_line) * legend_step, 4 + 16 * (i // per_line)
        parts.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="{y + 9}">{html.escape(release)}</text>')
    for j, (name, counts) in enumerate(classes):
        y = top_margin + j * row
        name = html.escape(str(name))
        parts.append(f'<text x="{label_width - 6}" y="{y + len(releases) * bar_height / 2 + 3:.0f}" '
                     f'text-anchor="end">{name}</text>')
        for i, (release, value, colour) in enumerate(zip(releases, counts, colours, strict=True)):
            yy = y + i * bar_height
            parts.append(f'<rect class="bar" data-release="{html.escape(release)}" x="{label_width}" y="{yy}" '
                         f'width="{value * scale:.1f}" height="{bar_height - 1}" fill="{colour}">'
                         f'<title>{name}, {html.escape(release)}: {value}</title></rect>'
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
                table(["dataset", "subject", *CHANGES], _summary_rows(result)) if result.summary
                else "<p>No change in scope.</p>"]
    for subject, name in (("directory", "Dataset versions"), ("file", "Files")):
        listed = _listed(result, subject)
        if listed:
            sections += [f"<h2>{name}</h2>", table(["change", "item", "detail"], [list(x) for x in listed])]
    sections += ["<h2>Cells per class</h2>",
                 cells_per_class_svg([result.old, result.new],
                                     [(r.class_name, [r.old, r.new]) for r in result.cells_per_class]),
                 table(["class", result.old, result.new, "change"],
                       [[r.class_name, r.old, r.new, f"{r.new - r.old:+d}"]
                        for r in result.cells_per_class])]
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")


def release_notes_path(mirror_root: Path, release: str, suffix: str = ".html") -> Path:
    """Where the release notes of ``release`` lie beside a local mirror (``.md`` or ``.html``)."""
    return Path(mirror_root) / "releases" / release / f"release-notes{suffix}"


def write_release_notes(result: ReleaseDiff, mirror_root: Path) -> tuple[Path, Path]:
    """``<mirror_root>/releases/<new>/release-notes.md`` and ``.html``, each written whole (temp file + rename)."""
    written = []
    for suffix, text in ((".md", release_notes_markdown(result)), (".html", release_notes_html(result))):
        path = release_notes_path(mirror_root, result.new, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        write_file_nofollow(partial, text.encode("utf-8"))  # a symlink planted there is refused, not followed
        partial.replace(path)
        written.append(path)
    return written[0], written[1]


def read_release_notes(mirror_root: Path, release: str) -> str | None:
    """The HTML release notes of ``release`` beside a local mirror, None when there are none. A symlink on
    the way (a directory or the file) is refused (:class:`etl.manifest.UnsafeKeyError`, or
    :class:`etl.transfer.SymlinkRefusedError` when planted meanwhile), never followed: the notes are served
    to whoever opens the releases page."""
    path = LocalRoot(Path(mirror_root)).path(f"releases/{release}/release-notes.html")
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8")
