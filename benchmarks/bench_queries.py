"""Analyst queries at full size: the demo's three questions and docs/schema.md's examples, timed with their plans.

    .venv/bin/python benchmarks/bench_queries.py --bucket DIR [--server URL] [--runs 7] [--keep]
    .venv/bin/python benchmarks/bench_queries.py --reuse NAME [--server URL]   # a database kept by --keep

Fills a scratch database of its own (created, and dropped at the end unless ``--keep``):

1. the metadata of two releases of a generated full-size consensus bucket (``--bucket``; generated
   with ``etl.fixtures.make_bucket``, metadata only, when missing: 7,651,713 cells, 6,721 clusters),
   served over S3 and taken through the CLI's path: discover, mirror, load, checks, publish
   (``etl.pipeline``; only the announcement after publishing, with its release diff, is left out);
2. synthetic expression at the real shapes for the newest release (the current one): per dataset,
   every cluster x 32,285 genes with each pair present with probability p_gene (p_gene ~ Beta(0.6,
   0.9), mean 0.4), and a few thousand region x subclass groups (each pair present with probability
   1 - (1 - p_gene)^3), the group sizes being the loaded cells'. It is written as per-dataset
   partials and goes through ``etl.aggregate.merge_and_publish``: the merge, the roll-up of
   supertype, subclass and class, the binary COPY into staging and the publication, so the tables,
   indexes and partitions are the real ones.

Needs about 33 GB for the database (19 GB of it expression arrays), 7.3 GB of partials and 3.6 GB
of mirror while filling (both deleted once loaded), up to 3.5 GB of PostgreSQL temporary files
for the reassignment count, and 12 GB of RAM (the synthetic partials, merged).

Then every query runs once in a fresh connection (the first, cold-ish run: new backend, data
possibly not in shared buffers, the page cache as the filling left it), ``--runs`` times warm
(median), and once under ``EXPLAIN (ANALYZE, BUFFERS)``. Analyst queries run as ``abc_reader``
(as the demo runs them); release comparisons read base tables and run as the connecting role.
Prints a Markdown report (figures against targets, machine load, sizes) and writes every plan
to ``--plans``. ``--reuse`` skips the filling and applies pending migrations first, so a new
migration is measured on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from etl import aggregate, db, pipeline  # noqa: E402
from etl import fixtures as fx  # noqa: E402
from etl.catalog import cell_assignments  # noqa: E402
from etl.config import Settings  # noqa: E402
from etl.discovery import discover  # noqa: E402
from etl.s3server import serve_s3  # noqa: E402
from etl.source import make_client  # noqa: E402

SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"
CELLS, CLUSTERS, GENES = 7_651_713, 6_721, 32_285
OLD, NEW = fx.OLD_RELEASE, fx.NEW_RELEASE
DATASETS = (fx.CONSENSUS_WMB, fx.MACOSKO)
CLUSTER_DENSITY = 0.4  # mean probability that a (cluster, gene) pair has an expressing cell
PREVALENCE_SHAPE = 0.6  # Beta(a, a * (1 - density) / density): many rare genes, many broad ones
REGION_SUBCLASS_SPREAD = 3  # a region x subclass pair is present as if it pooled this many clusters
REGIONS = ["ACA", "AI", "AUD", "CB", "CTXsp", "ENT", "HIP", "HY", "MB", "MO", "MY", "OLF", "P", "PAL", "RHP",
           "RSP", "SS", "STRd", "STRv", "TH", "VIS"]
REGIONS_PER_SUBCLASS = 9  # mean: region x subclass groups are ~ subclasses x 9 ("a few thousand")
BLOCK_GROUPS = 256  # groups drawn at a time


# --- filling ----------------------------------------------------------------------------------------

def bucket_ready(bucket: Path) -> bool:
    return (bucket / fx.BUCKET / "releases" / NEW / "manifest.json").is_file()


def load_releases(url: str, bucket: Path, mirror_root: Path) -> dict[str, float]:
    """Discover, mirror and load (checks, publish) OLD and NEW as ``abc-mirror load`` does, without
    the announcement (diff and alert) that follows publication; seconds per step."""
    seconds: dict[str, float] = {}
    with serve_s3(bucket) as server:
        settings = Settings.from_env().with_overrides(database_url=url, endpoint_url=server.endpoint_url,
                                                      mirror_root=str(mirror_root))
        engine = db.make_engine(url)
        started = time.perf_counter()
        discover(make_client(settings), settings, engine)
        engine.dispose()
        seconds["discover"] = time.perf_counter() - started
        for release in (OLD, NEW):
            started = time.perf_counter()
            pipeline.mirror(settings, release, progress=False, durable=False)
            seconds[f"mirror {release}"] = time.perf_counter() - started
            started = time.perf_counter()
            with pipeline.hold_release(settings, release):
                pipeline.load_metadata(settings, release)
                pipeline.validate_and_publish(settings, release)
            seconds[f"load, check, publish {release}"] = time.perf_counter() - started
            print(f"# {release}: {json.dumps(seconds)}", flush=True)
    return seconds


def gene_list() -> pd.DataFrame:
    """32,285 genes as the generator names them (Gad1 and the other well-known markers first)."""
    genes = fx.make_genes(fx.FixtureSpec(genes=GENES))
    return pd.DataFrame({"gene_identifier": np.asarray(genes.identifiers)[genes.wmb],
                         "gene_symbol": np.asarray(genes.symbols)[genes.wmb]})


def synthetic_stats(grouping: str, groups: pd.DataFrame, genes: pd.DataFrame, presence: np.ndarray,
                    rng: np.random.Generator) -> aggregate.GroupStats:
    """Statistics of ``groups`` (with n_cells) x genes: pair (k, g) present with probability presence[g];
    a present pair has 1..n_cells[k] expressing cells and log2 values around 2.5."""
    n_cells = groups["n_cells"].to_numpy(np.int64)
    counts, indices, nonzero, sums = [], [], [], []
    for lo in range(0, len(groups), BLOCK_GROUPS):
        hi = min(len(groups), lo + BLOCK_GROUPS)
        rows, cols = np.nonzero(rng.random((hi - lo, len(genes)), dtype=np.float32) < presence)
        counts.append(np.bincount(rows, minlength=hi - lo))
        indices.append(cols.astype(np.int32))
        size = n_cells[lo + rows]
        expressing = np.clip(np.rint(rng.random(len(rows)) ** 3 * size), 1, size).astype(np.uint32)
        level = np.exp(rng.normal(0.9, 0.4, len(rows)))
        block = np.empty((len(rows), 2))
        block[:, 0] = expressing * level
        block[:, 1] = expressing * level * level * 1.1
        nonzero.append(expressing)
        sums.append(block)
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    return aggregate.GroupStats(grouping, groups.reset_index(drop=True), genes, indptr, np.concatenate(indices),
                                np.concatenate(sums), np.concatenate(nonzero))


def synthetic_file_stats(dataset: str, assignments: pd.DataFrame, taxonomy: aggregate.ClusterTaxonomy,
                         genes: pd.DataFrame, rng: np.random.Generator) -> aggregate.FileStats:
    """A dataset's base groupings (cluster, region x subclass) over its loaded cells, synthetic values."""
    alias = assignments["cluster_alias"].dropna().astype("int64").astype(str)
    cluster_of_cell = taxonomy.labels["cluster"].reindex(alias.to_numpy()).to_numpy()
    cells_per_cluster = pd.Series(cluster_of_cell).value_counts()
    clusters = pd.DataFrame({"group_label": taxonomy.clusters.to_numpy(), "region_of_interest_acronym": ""})
    clusters["n_cells"] = cells_per_cluster.reindex(clusters["group_label"]).fillna(0).astype(np.int64).to_numpy()
    clusters = clusters[clusters["n_cells"] > 0]
    alpha = PREVALENCE_SHAPE
    prevalence = rng.beta(alpha, alpha * (1 - CLUSTER_DENSITY) / CLUSTER_DENSITY, len(genes)).astype(np.float32)

    subclass_of_cluster = taxonomy.parent_of_cluster("subclass")
    cells_per_subclass = clusters.groupby(subclass_of_cluster.reindex(clusters["group_label"]).to_numpy())[
        "n_cells"].sum()
    pairs = []
    for subclass, n in cells_per_subclass.items():
        picked = rng.choice(REGIONS, size=min(len(REGIONS), 1 + rng.poisson(REGIONS_PER_SUBCLASS - 1)), replace=False)
        split = rng.multinomial(n, rng.dirichlet(np.ones(len(picked))))
        pairs += [(subclass, region, k) for region, k in zip(picked, split, strict=True) if k > 0]
    region_subclass = pd.DataFrame(pairs, columns=["group_label", "region_of_interest_acronym", "n_cells"]).sort_values(
        ["group_label", "region_of_interest_acronym"], ignore_index=True)
    pooled = (1 - (1 - prevalence) ** REGION_SUBCLASS_SPREAD).astype(np.float32)
    stats = {"cluster": synthetic_stats("cluster", clusters, genes, prevalence, rng),
             aggregate.REGION_SUBCLASS: synthetic_stats(aggregate.REGION_SUBCLASS, region_subclass, genes, pooled, rng)}
    n = int(clusters["n_cells"].sum())
    return aggregate.FileStats(f"synthetic:{dataset}", "log2", n, n, stats)


def publish_expression(url: str, release: str, work: Path, seed: int) -> dict:
    """Synthetic partials of both datasets, merged, rolled up, staged and published by etl.aggregate."""
    rng = np.random.default_rng(seed)
    genes = gene_list()
    partials: dict[str, list[Path]] = {}
    with db.copy_connection(url) as conn:
        membership = aggregate.release_taxonomy(conn, release)
        taxonomy = aggregate.ClusterTaxonomy(membership)
        for dataset in DATASETS:
            file_stats = synthetic_file_stats(dataset, cell_assignments(conn, release, dataset), taxonomy, genes, rng)
            print(f"# {dataset}: " + ", ".join(f"{g} {len(s.groups)} groups {s.n_pairs:,} pairs"
                                              for g, s in file_stats.stats.items()), flush=True)
            partials[dataset] = [aggregate.save_partial(file_stats, work / f"{dataset}.npz")]
            del file_stats
        started = time.perf_counter()
        entries = aggregate.merge_and_publish(conn, release, partials, membership)
    return {"merge_and_publish_seconds": time.perf_counter() - started, "entries": entries}


# --- queries ----------------------------------------------------------------------------------------

@dataclass
class Query:
    name: str
    source: str  # where the query text comes from
    text: str
    target_ms: float | None = None
    as_reader: bool = True  # abc_reader can run it (analyst views only)


def queries(conn: psycopg.Connection) -> list[Query]:
    """The demo's three questions (scripts/demo.py), docs/schema.md's examples with this database's
    release and names, and the release diff's reassignment count as plain SQL."""
    from scripts.demo import ANALYST_QUERIES  # the demo's own text

    cluster_name, cluster_label = conn.execute(
        "SELECT group_name, group_label FROM abc.expression_group WHERE release = %s AND dataset = %s "
        "AND grouping = 'cluster' ORDER BY n_cells DESC LIMIT 1", (NEW, fx.CONSENSUS_WMB)).fetchone()
    region = conn.execute("SELECT region_of_interest_acronym FROM abc.library WHERE release = %s "
                          "GROUP BY 1 ORDER BY count(*) DESC LIMIT 1", (NEW,)).fetchone()[0]
    demo_targets = [100.0, None, 20.0]  # cells per class; (none); one gene across all clusters
    found = [Query(f"demo: {title}", "scripts/demo.py", text, target)
             for (title, text), target in zip(ANALYST_QUERIES, demo_targets, strict=True)]
    found += [
        Query("docs: cells per class per dataset, counted from the cells", "docs/schema.md (and scripts/demo.py "
              "before sql/011)", "SELECT dataset, class_name, count(*) AS cells FROM abc.current_cell_annotated "
              "GROUP BY dataset, class_name ORDER BY dataset, class_name"),
        Query("docs: clusters present in both datasets (listed)", "docs/schema.md",
              "SELECT cluster_alias FROM abc.current_cluster_cell_count GROUP BY cluster_alias "
              "HAVING count(DISTINCT dataset) = 2 ORDER BY cluster_alias"),
        Query(f"docs: cells of a region ({region}) with their subclass", "docs/schema.md",
              f"SELECT cell_label, subclass_name FROM abc.current_cell_annotated "
              f"WHERE region_of_interest_acronym = '{region}'"),
        Query("docs: how a cluster's cell count moved between two releases", "docs/schema.md",
              f"SELECT dataset, cluster_alias, sum(n_cells) FILTER (WHERE release = '{OLD}') AS before, "
              f"sum(n_cells) FILTER (WHERE release = '{NEW}') AS after FROM abc.cluster_cell_count "
              f"WHERE release IN ('{OLD}', '{NEW}') GROUP BY dataset, cluster_alias "
              f"ORDER BY abs(coalesce(sum(n_cells) FILTER (WHERE release = '{NEW}'), 0) "
              f"- coalesce(sum(n_cells) FILTER (WHERE release = '{OLD}'), 0)) DESC LIMIT 20", as_reader=False),
        Query("docs: Gad1 across all clusters of one dataset", "docs/schema.md",
              f"SELECT group_name, mean, fraction, n_cells FROM abc.expression_by_cluster WHERE release = '{NEW}' "
              f"AND dataset = '{fx.MACOSKO}' AND gene_symbol = 'Gad1' ORDER BY mean DESC", 20.0),
        Query("docs: top 50 genes of one cluster", "docs/schema.md",
              f"SELECT gene_symbol, mean, fraction, n_cells FROM abc.cluster_profile WHERE release = '{NEW}' "
              f"AND dataset = '{fx.CONSENSUS_WMB}' AND group_name = '{cluster_name}' ORDER BY mean DESC LIMIT 50",
              100.0),
        Query("docs: one cluster's genes in both datasets side by side", "docs/schema.md",
              f"SELECT coalesce(m.gene_symbol, w.gene_symbol) AS gene_symbol, m.mean AS macosko_mean, "
              f"m.fraction AS macosko_fraction, w.mean AS wmb_mean, w.fraction AS wmb_fraction "
              f"FROM (SELECT * FROM abc.cluster_profile WHERE release = '{NEW}' AND dataset = '{fx.MACOSKO}' "
              f"AND group_label = '{cluster_label}') m "
              f"FULL JOIN (SELECT * FROM abc.cluster_profile WHERE release = '{NEW}' "
              f"AND dataset = '{fx.CONSENSUS_WMB}' "
              f"AND group_label = '{cluster_label}') w USING (gene_identifier) "
              f"WHERE greatest(m.fraction, w.fraction) >= 0.2 ORDER BY greatest(m.mean, w.mean) DESC"),
        Query("docs: Gad1 by region within each subclass", "docs/schema.md",
              f"SELECT group_name AS subclass, region_of_interest_acronym, mean, fraction, n_cells "
              f"FROM abc.expression_by_region_subclass WHERE release = '{NEW}' AND dataset = '{fx.CONSENSUS_WMB}' "
              f"AND gene_symbol = 'Gad1' ORDER BY subclass, mean DESC"),
        Query("diff: cells re-assigned to another cluster (the query shape of the release diff)",
              "release diff (etl/diff.py's cells, as SQL)",
              "WITH old AS (SELECT c.dataset, c.cell_label, "
              "coalesce(c.cluster_alias, m.cluster_alias) AS cluster_alias FROM abc.cell c "
              "LEFT JOIN abc.cell_cluster_membership m ON m.release = c.release "
              f"AND m.cell_label = c.cell_label WHERE c.release = '{OLD}'), "
              "new AS (SELECT c.dataset, c.cell_label, coalesce(c.cluster_alias, m.cluster_alias) AS cluster_alias "
              "FROM abc.cell c LEFT JOIN abc.cell_cluster_membership m ON m.release = c.release "
              f"AND m.cell_label = c.cell_label WHERE c.release = '{NEW}') "
              "SELECT count(*) AS reassigned FROM old JOIN new USING (dataset, cell_label) "
              "WHERE old.cluster_alias IS DISTINCT FROM new.cluster_alias", 5000.0, as_reader=False),
    ]
    return found


def connect(url: str, as_reader: bool) -> psycopg.Connection:
    conn = psycopg.connect(db.psycopg_dsn(url), autocommit=True)
    if as_reader:
        conn.execute("SET ROLE abc_reader")
    return conn


def timed(conn: psycopg.Connection, text: str) -> tuple[float, int]:
    started = time.perf_counter()
    rows = conn.execute(text).fetchall()
    return (time.perf_counter() - started) * 1000, len(rows)


def steal_seconds() -> float:
    """Time this VM's CPUs were ready to run but the host ran something else (/proc/stat)."""
    return int(Path("/proc/stat").read_text().split()[8]) / os.sysconf("SC_CLK_TCK")


def measure(url: str, query: Query, runs: int, timeout_s: float) -> dict:
    """First run in a fresh connection, ``runs`` warm runs, then the plan under EXPLAIN (ANALYZE, BUFFERS).

    A query still running after ``timeout_s`` is cancelled; its plan is then EXPLAIN's, without ANALYZE.
    """
    load, steal = os.getloadavg()[0], steal_seconds()
    result = {"query": query.name, "target_ms": query.target_ms, "timed_out_s": None}
    with connect(url, query.as_reader) as conn:
        conn.execute(f"SET statement_timeout = {round(timeout_s * 1000)}")
        try:
            result["first_ms"], result["rows"] = timed(conn, query.text)
            result["warm_ms"] = [timed(conn, query.text)[0] for _ in range(runs)]
            explain = "EXPLAIN (ANALYZE, BUFFERS) "
        except psycopg.errors.QueryCanceled:
            result["timed_out_s"] = timeout_s
            explain = "EXPLAIN "
        result["plan"] = "\n".join(r[0] for r in conn.execute(explain + query.text).fetchall())
    if result["timed_out_s"] is None:
        result["median_ms"] = statistics.median(result["warm_ms"])
    return {**result, "load_1min": [load, os.getloadavg()[0]], "steal_s": steal_seconds() - steal}


def wait_for_autovacuum(url: str, limit_s: float) -> float:
    """Wait (at most ``limit_s``) until no autovacuum worker runs in the database: after a publication
    it vacuums and analyses the new partitions, which would be timed along with the queries."""
    started = time.perf_counter()
    with psycopg.connect(db.psycopg_dsn(url), autocommit=True) as conn:
        while time.perf_counter() - started < limit_s and conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'autovacuum worker'").fetchone()[0]:
            time.sleep(5)
    return time.perf_counter() - started


# --- sizes ------------------------------------------------------------------------------------------

SIZES = """
SELECT p.relid::regclass::text AS partition, count(*) OVER () AS n,
       pg_total_relation_size(p.relid) AS total, pg_table_size(p.relid) AS heap_and_toast,
       pg_indexes_size(p.relid) AS indexes, c.reltuples::bigint AS rows
FROM pg_partitioned_table t
JOIN pg_class r ON r.oid = t.partrelid
JOIN pg_namespace s ON s.oid = r.relnamespace AND s.nspname = 'abc'
CROSS JOIN LATERAL pg_partition_tree(t.partrelid) p
JOIN pg_class c ON c.oid = p.relid
WHERE p.isleaf
ORDER BY total DESC
"""


def sizes(url: str) -> list[dict]:
    with psycopg.connect(db.psycopg_dsn(url)) as conn:
        rows = conn.execute(SIZES).fetchall()
        database = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return [{"partition": "(whole database)", "total": database, "heap_and_toast": None, "indexes": None,
             "rows": None}] + [{"partition": r[0], "total": r[2], "heap_and_toast": r[3], "indexes": r[4],
                                "rows": r[5]} for r in rows]


def server_settings(url: str) -> str:
    with psycopg.connect(db.psycopg_dsn(url)) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        shown = [f"{name}={conn.execute(f'SHOW {name}').fetchone()[0]}" for name in
                 ("shared_buffers", "work_mem", "effective_cache_size", "max_parallel_workers_per_gather", "jit",
                  "autovacuum")]
    return f"PostgreSQL {version}, " + ", ".join(shown)


def expression_statistics(url: str) -> list[str]:
    """When each expression partition was last analysed: the pipeline does not ANALYZE them itself."""
    with psycopg.connect(db.psycopg_dsn(url)) as conn:
        rows = conn.execute(
            "SELECT relname, last_analyze, last_autoanalyze FROM pg_stat_user_tables "
            "WHERE schemaname = 'abc_part' AND relname LIKE 'expression%' ORDER BY relname").fetchall()
    return [f"{name}: analyzed {manual or '-'}, autoanalyzed {auto or '-'}" for name, manual, auto in rows]


# --- report -----------------------------------------------------------------------------------------

def megabytes(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.0f}"


def report(results: list[dict], table_sizes: list[dict], settings: str, analysed: list[str]) -> str:
    lines = [f"Server: {settings}", "", "| query | rows | first run ms | warm median ms (runs) | "
             "EXPLAIN ANALYZE ms | target | met | load 1 min | steal s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for r in results:
        executed = next((line.split(":", 1)[1].strip() for line in r["plan"].splitlines()
                         if line.startswith("Execution Time")), "")
        target = f"< {r['target_ms']:,.0f} ms" if r["target_ms"] else "-"
        if r["timed_out_s"] is not None:
            lines.append(f"| {r['query']} | | cancelled after {r['timed_out_s']:,.0f} s | | | {target} | "
                         f"{'**no**' if r['target_ms'] else '-'} | {r['load_1min'][0]:.2f}-{r['load_1min'][1]:.2f} | "
                         f"{r['steal_s']:.2f} |")
            continue
        met = "-" if not r["target_ms"] else ("yes" if r["median_ms"] < r["target_ms"] else "**no**")
        lines.append(f"| {r['query']} | {r['rows']:,} | {r['first_ms']:,.1f} | {r['median_ms']:,.1f} "
                     f"({len(r['warm_ms'])}) | {executed} | {target} | {met} | "
                     f"{r['load_1min'][0]:.2f}-{r['load_1min'][1]:.2f} | {r['steal_s']:.2f} |")
    lines += ["", "| partition | rows (estimate) | total MB | heap + TOAST MB | indexes MB |",
              "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {s['partition']} | {'' if s['rows'] is None else format(s['rows'], ',')} | {megabytes(s['total'])} | "
              f"{megabytes(s['heap_and_toast'])} | {megabytes(s['indexes'])} |" for s in table_sizes]
    lines += ["", "Statistics of the expression partitions when measured:", *[f"- {a}" for a in analysed]]
    return "\n".join(lines)


def plans_text(results: list[dict], queries_run: list[Query]) -> str:
    parts = []
    for r, q in zip(results, queries_run, strict=True):
        cancelled = f" Cancelled after {r['timed_out_s']:,.0f} s: EXPLAIN without ANALYZE." if r["timed_out_s"] else ""
        parts += [f"### {q.name}", "", f"From {q.source}; run as {'abc_reader' if q.as_reader else 'the owner'}."
                  + cancelled,
                  "", "```sql", q.text, "```", "", "```", r["plan"], "```", ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", type=Path, help="a generated full-size bucket (generated here when missing)")
    parser.add_argument("--cells", type=int, default=CELLS, help="cells of a generated bucket")
    parser.add_argument("--clusters", type=int, default=CLUSTERS, help="clusters of a generated bucket")
    parser.add_argument("--work", type=Path, default=Path("/tmp/abc-bench-queries"),
                        help="mirror and synthetic partials go here")
    parser.add_argument("--server", default=SERVER, help="SQLAlchemy URL of the server, without a database")
    parser.add_argument("--database", default="abc_bench_queries", help="name of the scratch database")
    parser.add_argument("--reuse", action="store_true", help="measure the database kept by an earlier --keep run "
                        "(pending migrations applied first)")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--runs", type=int, default=7, help="warm runs per query (median reported)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--plans", type=Path, default=Path("bench_queries_plans.md"))
    parser.add_argument("--only", help="measure only the queries whose name contains this")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds after which a query is cancelled")
    parser.add_argument("--autovacuum-wait", type=float, default=1800.0,
                        help="at most this many seconds waiting for autovacuum to finish before measuring")
    args = parser.parse_args()
    url = f"{args.server}/{args.database}"

    if args.reuse:
        print(f"# applied: {', '.join(db.upgrade(db.make_engine(url))) or 'nothing'}", flush=True)
    else:
        if args.bucket is None:
            parser.error("--bucket is needed to fill a database (or --reuse a kept one)")
        if not bucket_ready(args.bucket):
            started = time.perf_counter()
            fx.make_bucket(args.bucket, fx.FixtureSpec(cells=args.cells, clusters=args.clusters, metadata_only=True))
            print(f"# bucket generated in {time.perf_counter() - started:.0f} s", flush=True)
        db.drop_database(url)
        db.create_database(url)
        db.upgrade(db.make_engine(url))
        filled = load_releases(url, args.bucket, args.work / "mirror")
        shutil.rmtree(args.work / "mirror")  # loaded: only the database is measured
        filled.update(publish_expression(url, NEW, args.work / "partials", args.seed))
        shutil.rmtree(args.work / "partials")
        print(f"# filled: {json.dumps(filled)}", flush=True)
    try:
        with psycopg.connect(db.psycopg_dsn(url)) as conn:
            chosen = [q for q in queries(conn) if not args.only or args.only in q.name]
        print(f"# waited {wait_for_autovacuum(url, args.autovacuum_wait):.0f} s for autovacuum", flush=True)
        analysed = expression_statistics(url)
        results = []
        for query in chosen:
            results.append(measure(url, query, args.runs, args.timeout))
            shown = {k: v for k, v in results[-1].items() if k != "plan"}
            print(json.dumps(shown), flush=True)
        args.plans.write_text(plans_text(results, chosen))
        print(report(results, sizes(url), server_settings(url), analysed))
    finally:
        if not args.keep:
            db.drop_database(url)


if __name__ == "__main__":
    main()
