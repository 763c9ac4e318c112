"""A generated ``allen-brain-cell-atlas`` bucket tree, shaped like the real one, for tests and demos.

It follows the real layout (``../shared/abc_layout.md``): ``releases/<date>/manifest.json`` in the
schema ``manifest_builder.py`` writes, metadata CSVs with the real file and column names, and
AnnData ``.h5ad`` matrices (CSR, ``-raw`` counts and ``-log2`` values, split by region, obs indexed
by ``cell_label``, var by ``gene_identifier``) for the consensus mouse datasets and the WMB
matrices they reuse.

Two releases are written. The newer one pins a new dated directory of the consensus WMB cell
metadata (some cells re-assigned, some dropped, some added) and keeps every other directory, so
most keys are shared between releases exactly as in the real bucket.

Expression is a generative model meant to make aggregation meaningful: every taxonomy node
(class, subclass, supertype, cluster) owns marker genes; a cell's UMIs are drawn from a heavy
tailed background plus its lineage's markers with a per-cell marker share, and library sizes are
log-normal, so counts are sparse and overdispersed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

BUCKET = "allen-brain-cell-atlas"
BUCKET_URL = f"https://{BUCKET}.s3.us-west-2.amazonaws.com/"
OLD_RELEASE = "20251031"
NEW_RELEASE = "20260331"
WMB_MATRIX_VERSION = "20230630"

# Directory names as abc_atlas_access's consensus notebooks and client use them (the draft description
# pages call them Consensus-Mouse-*; see docs/layout.md).
MACOSKO = "Consensus-WMB-Macosko-10X"
CONSENSUS_WMB = "Consensus-WMB-AIBS-10X"
TAXONOMY = "Consensus-WMB-integrated-taxonomy"
MACOSKO_MATRIX_PREFIX = "Macosko-10X"
WMB_V2 = "WMB-10Xv2"
WMB_V3 = "WMB-10Xv3"

# Region split tags of the real matrices. WMB: the tags both chemistries have come first (10Xv2 alone
# also has Isocortex-3/4, 10Xv3 alone CB, MY, P, PAL, STR).
WMB_REGIONS = ["CTXsp", "HPF", "HY", "MB", "OLF", "TH", "Isocortex-1", "Isocortex-2"]
MACOSKO_REGIONS = ["CB", "HPF", "HY", "Isocortex", "MB", "MY-Pons-BS", "OLF", "PAL", "STR", "TH"]
TERM_SETS = ["class", "subclass", "supertype", "cluster"]
TAXONOMY_PREFIX = "CCN20251031"  # term sets; terms are CS20251031_*
WELL_KNOWN_GENES = ["Snap25", "Slc17a7", "Gad1", "Gad2", "Slc32a1", "Olig2", "Gfap", "Aqp4",
                    "Mbp", "Plp1", "Cx3cr1", "Pdgfra", "Sst", "Pvalb", "Vip", "Lamp5", "Cck",
                    "Th", "Slc6a3", "Tph2", "Chat", "Hcrt", "Pmch", "Avp", "Oxt"]


@dataclass(frozen=True)
class FixtureSpec:
    """Scale of a generated bucket; the defaults make a small, fast tree for tests."""

    seed: int = 20251031
    cells: int = 4000
    genes: int = 500
    clusters: int = 48
    regions: int = 3
    umis_per_cell: int = 600
    qc_dropped_fraction: float = 0.02  # cells in a matrix that the metadata does not list

    @property
    def taxonomy_sizes(self) -> dict[str, int]:
        """Class/subclass/supertype counts in the consensus taxonomy's proportions."""
        n = self.clusters
        classes = max(2, round(n * 40 / 6756))
        subclasses = max(classes, round(n * 411 / 6756))
        supertypes = max(subclasses, round(n * 1753 / 6756))
        return {"class": classes, "subclass": subclasses, "supertype": supertypes, "cluster": n}


def md5_of_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Taxonomy:
    """Hierarchy as parent index arrays; node i of level L has name/label from these tables."""

    parents: dict[str, np.ndarray]  # level -> index into the level above
    labels: dict[str, list[str]]
    names: dict[str, list[str]]
    colors: dict[str, list[str]]
    markers: dict[str, list[np.ndarray]]  # level -> per node gene indices

    def lineage(self, cluster: int) -> dict[str, int]:
        out = {"cluster": cluster}
        node = cluster
        for child, parent in zip(TERM_SETS[:0:-1], TERM_SETS[-2::-1], strict=True):
            node = int(self.parents[child][node])
            out[parent] = node
        return out


@dataclass
class Genes:
    identifiers: list[str]
    symbols: list[str]
    background: np.ndarray  # cumulative distribution for background UMIs


@dataclass
class DatasetCells:
    """Cells of one dataset; ``in_metadata`` False marks cells only the matrix has (QC'd out)."""

    dataset: str
    matrix_dataset: dict[str, str]  # feature_matrix_label -> expression dataset directory
    frame: pd.DataFrame
    in_metadata: np.ndarray
    cluster: np.ndarray


@dataclass
class GeneratedBucket:
    root: Path
    spec: FixtureSpec
    releases: list[str]
    files: dict[str, list[str]] = field(default_factory=dict)  # release -> relative paths

    @property
    def bucket_dir(self) -> Path:
        return self.root / BUCKET


def _rng(spec: FixtureSpec, stream: str) -> np.random.Generator:
    """Independent stream per component, so growing one part leaves the others unchanged."""
    key = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")
    return np.random.default_rng([spec.seed, key])


def _color(rng: np.random.Generator) -> str:
    return "#" + "".join(f"{v:02X}" for v in rng.integers(0, 256, size=3))


def make_genes(spec: FixtureSpec) -> Genes:
    rng = _rng(spec, "genes")
    numbers = np.sort(rng.choice(np.arange(1, 99999), size=spec.genes, replace=False))
    identifiers = [f"ENSMUSG{n:011d}" for n in numbers]
    symbols = [WELL_KNOWN_GENES[i] if i < len(WELL_KNOWN_GENES) else f"Gm{10000 + i}"
               for i in range(spec.genes)]
    weights = rng.lognormal(mean=0.0, sigma=2.0, size=spec.genes)
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    return Genes(identifiers, symbols, cdf)


def make_taxonomy(spec: FixtureSpec) -> Taxonomy:
    rng = _rng(spec, "taxonomy")
    sizes = spec.taxonomy_sizes
    parents: dict[str, np.ndarray] = {}
    for parent, child in zip(TERM_SETS, TERM_SETS[1:], strict=False):
        # Every parent gets at least one child; the rest are spread at random.
        n_parent, n_child = sizes[parent], sizes[child]
        assignment = np.concatenate([np.arange(n_parent), rng.integers(0, n_parent, n_child - n_parent)])
        parents[child] = np.sort(assignment)
    labels, names, colors, markers = {}, {}, {}, {}
    markers_per_node = {"class": 8, "subclass": 5, "supertype": 3, "cluster": 3}
    for level_number, level in enumerate(TERM_SETS, start=1):
        n = sizes[level]
        code = {"class": "CLAS", "subclass": "SUBC", "supertype": "SUPT", "cluster": "CLUS"}[level]
        labels[level] = [f"CS20251031_{code}_{i + 1:04d}" for i in range(n)]
        if level == "cluster":
            names[level] = [f"{i + 1:04d} {names['supertype'][parents['cluster'][i]]}" for i in range(n)]
        elif level == "class":
            names[level] = [f"{i + 1:02d} Class-{i + 1} NN" if i % 3 == 2 else
                            f"{i + 1:02d} Class-{i + 1} Glut" for i in range(n)]
        else:
            above = TERM_SETS[level_number - 2]
            names[level] = [f"{i + 1:04d} {names[above][parents[level][i]].split(' ', 1)[1]}_{i + 1}"
                            for i in range(n)]
        colors[level] = [_color(rng) for _ in range(n)]
        k = min(markers_per_node[level], spec.genes)
        markers[level] = [rng.choice(spec.genes, size=k, replace=False) for _ in range(n)]
    return Taxonomy(parents, labels, names, colors, markers)


def _library_labels(rng: np.random.Generator, prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:04d}_{chr(65 + int(rng.integers(0, 8)))}{int(rng.integers(1, 13)):02d}"
            for i in range(n)]


def _barcodes(rng: np.random.Generator, n: int) -> np.ndarray:
    letters = np.array(list("ACGT"))
    return np.array(["".join(row) for row in letters[rng.integers(0, 4, size=(n, 16))]])


def _region_of_clusters(rng: np.random.Generator, n_clusters: int, regions: list[str]) -> np.ndarray:
    """Each cluster prefers one region, so region x subclass groups are informative."""
    return rng.integers(0, len(regions), size=n_clusters)


def make_dataset_cells(spec: FixtureSpec, dataset: str, taxonomy: Taxonomy, n_cells: int) -> DatasetCells:
    rng = _rng(spec, f"cells:{dataset}")
    n_clusters = spec.taxonomy_sizes["cluster"]
    if dataset == MACOSKO:
        regions = MACOSKO_REGIONS[: spec.regions]
        chemistry = np.array(["10Xv3"] * n_cells)
        labels_for = {r: f"{MACOSKO_MATRIX_PREFIX}-{r}" for r in regions}
        matrix_dataset = {label: MACOSKO for label in labels_for.values()}
    else:
        regions = WMB_REGIONS[: spec.regions]
        chemistry = np.where(rng.random(n_cells) < 0.4, "10Xv2", "10Xv3")
        labels_for = {r: r for r in regions}
        matrix_dataset = {f"WMB-{c}-{r}": f"WMB-{c}" for c in ("10Xv2", "10Xv3") for r in regions}
    cluster_weights = rng.lognormal(0.0, 1.0, size=n_clusters)
    cluster = rng.choice(n_clusters, size=n_cells, p=cluster_weights / cluster_weights.sum())
    home = _region_of_clusters(rng, n_clusters, regions)
    at_home = rng.random(n_cells) < 0.75
    region_index = np.where(at_home, home[cluster], rng.integers(0, len(regions), size=n_cells))
    region = np.array(regions)[region_index]
    n_donors = max(2, n_cells // 2000)
    donors = [f"Snap25-IRES2-Cre;Ai14-{400000 + i}" if dataset != MACOSKO else f"pBICCNsMMrMB{i:03d}"
              for i in range(n_donors)]
    donor_index = rng.integers(0, n_donors, size=n_cells)
    n_libraries = max(4, n_cells // 300)
    library_pool = _library_labels(rng, "L8TX_" if dataset != MACOSKO else "pBICCNsMMr", n_libraries)
    library = np.array(library_pool)[rng.integers(0, n_libraries, size=n_cells)]
    barcode = _barcodes(rng, n_cells)
    cell_label = np.char.add(np.char.add(barcode, "-"), library)
    # Barcodes are random; make labels unique deterministically if two collide.
    _, first = np.unique(cell_label, return_index=True)
    duplicate = np.ones(n_cells, dtype=bool)
    duplicate[first] = False
    cell_label[duplicate] = np.char.add(cell_label[duplicate], "-2")
    if dataset == MACOSKO:
        feature_matrix_label = np.array([labels_for[r] for r in region])
    else:
        feature_matrix_label = np.char.add(np.char.add(np.char.add("WMB-", chemistry), "-"), region)
    frame = pd.DataFrame({
        "cell_label": cell_label,
        "cell_barcode": barcode,
        "barcoded_cell_sample_label": library,
        "library_label": library,
        "feature_matrix_label": feature_matrix_label,
        "entity": "nuclei" if dataset == MACOSKO else "cell",
        "brain_section_label": "",
        "library_method": np.char.add("10X", np.char.replace(chemistry, "10X", "")),
        "region_of_interest_acronym": region,
        "donor_label": np.array(donors)[donor_index],
        "donor_genotype": "wt/wt" if dataset == MACOSKO else "Snap25-IRES2-Cre/wt;Ai14(RCL-tdT)/wt",
        "donor_sex": np.where(donor_index % 2 == 0, "M", "F"),
        "dataset_label": dataset,
        "x": np.round(rng.normal(0, 5, n_cells), 6),
        "y": np.round(rng.normal(0, 5, n_cells), 6),
        "cluster_alias": cluster + 1,
        "abc_sample_id": [f"{hashlib.md5(c.encode()).hexdigest()[:8]}" for c in cell_label],
        "gene_count": 0,
        "umi_count": 0,
        "doublet_score": np.round(rng.beta(1, 20, n_cells), 6),
    })
    in_metadata = rng.random(n_cells) >= spec.qc_dropped_fraction
    return DatasetCells(dataset, matrix_dataset, frame, in_metadata, cluster)


def _draw_counts(
    spec: FixtureSpec, rng: np.random.Generator, genes: Genes, taxonomy: Taxonomy,
    clusters: np.ndarray, depth: float,
) -> sp.csr_matrix:
    """UMI counts for a block of cells, as CSR (cells x genes), without a dense matrix."""
    n = len(clusters)
    totals = np.maximum(50, rng.lognormal(np.log(depth), 0.45, size=n)).astype(np.int64)
    marker_share = rng.beta(2.0, 5.0, size=n)
    n_marker = rng.binomial(totals, marker_share)
    n_background = totals - n_marker
    rows_bg = np.repeat(np.arange(n), n_background)
    cols_bg = np.searchsorted(genes.background, rng.random(int(n_background.sum())), side="right")
    cols_bg = np.minimum(cols_bg, spec.genes - 1)
    rows_mk, cols_mk = [], []
    for i, cluster in enumerate(clusters):
        lineage = taxonomy.lineage(int(cluster))
        pool = np.concatenate([taxonomy.markers[level][lineage[level]] for level in TERM_SETS])
        rows_mk.append(np.full(n_marker[i], i))
        cols_mk.append(pool[rng.integers(0, len(pool), size=n_marker[i])])
    rows = np.concatenate([rows_bg, *rows_mk])
    cols = np.concatenate([cols_bg, *cols_mk])
    counts = sp.coo_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                           shape=(n, spec.genes)).tocsr()
    counts.sum_duplicates()
    counts.sort_indices()
    return counts


def log2_cpm(counts: sp.csr_matrix) -> sp.csr_matrix:
    """log2(CPM + 1) of a counts CSR block, the normalisation of the ``-log2`` matrices."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(1e6, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    out = counts.copy().astype(np.float32)
    out.data = np.log2(out.data * np.repeat(scale, np.diff(out.indptr)) + 1).astype(np.float32)
    return out


class H5adAppender:
    """An h5ad file whose X (CSR) grows block by block: memory stays at one block.

    The file is written under a temporary name and renamed into place by :meth:`close`.
    """

    def __init__(self, path: Path, obs: pd.DataFrame, var: pd.DataFrame) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        ad.AnnData(obs=obs, var=var).write_h5ad(self.tmp)
        self.store = h5py.File(self.tmp, "a")
        if "X" in self.store:
            del self.store["X"]
        self.n_vars = len(var)
        self.matrix = None

    def append(self, block: sp.csr_matrix) -> None:
        if self.matrix is None:
            ad.io.write_elem(self.store, "X", block,
                             dataset_kwargs={"chunks": (1 << 16,)})
            self.matrix = ad.io.sparse_dataset(self.store["X"])
        else:
            self.matrix.append(block)

    def close(self) -> None:
        if self.matrix is None:
            ad.io.write_elem(self.store, "X", sp.csr_matrix((0, self.n_vars), dtype=np.float32))
        self.store.close()
        os.replace(self.tmp, self.path)


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def write_matrices(
    spec: FixtureSpec, out_dir: Path, cells: DatasetCells, genes: Genes, taxonomy: Taxonomy,
    matrix_label: str, block_cells: int = 5000,
) -> list[Path]:
    """Write ``<label>-raw.h5ad`` and ``<label>-log2.h5ad`` for the cells of one matrix."""
    frame = cells.frame
    chosen = np.flatnonzero(frame["feature_matrix_label"].to_numpy() == matrix_label)
    chosen = chosen[np.argsort(frame["cell_label"].to_numpy()[chosen], kind="stable")]
    obs = pd.DataFrame(index=pd.Index(frame["cell_label"].to_numpy()[chosen], name="cell_label"))
    var = pd.DataFrame({"gene_symbol": genes.symbols},
                       index=pd.Index(genes.identifiers, name="gene_identifier"))
    depth = spec.umis_per_cell * (0.6 if "10Xv2" in matrix_label else 1.0)
    rng = _rng(spec, f"counts:{matrix_label}")
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = H5adAppender(out_dir / f"{matrix_label}-raw.h5ad", obs, var)
    log2 = H5adAppender(out_dir / f"{matrix_label}-log2.h5ad", obs, var)
    umi_count = np.zeros(len(chosen), dtype=np.int64)
    gene_count = np.zeros(len(chosen), dtype=np.int64)
    for part in _blocks(len(chosen), block_cells):
        block = _draw_counts(spec, rng, genes, taxonomy, cells.cluster[chosen[part]], depth)
        raw.append(block)
        log2.append(log2_cpm(block))
        umi_count[part] = np.asarray(block.sum(axis=1)).ravel()
        gene_count[part] = np.diff(block.indptr)
    raw.close()
    log2.close()
    # The real cell metadata carries these per-cell statistics of the matrices.
    frame.loc[frame.index[chosen], "umi_count"] = umi_count
    frame.loc[frame.index[chosen], "gene_count"] = gene_count
    return [raw.path, log2.path]


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)


def taxonomy_tables(taxonomy: Taxonomy, cluster_cells: np.ndarray) -> dict[str, pd.DataFrame]:
    """The consensus taxonomy's CSV tables, keyed by file stem."""
    sizes = {level: len(taxonomy.labels[level]) for level in TERM_SETS}
    cells_per = {"cluster": cluster_cells}
    for child, parent in zip(TERM_SETS[:0:-1], TERM_SETS[-2::-1], strict=True):
        cells_per[parent] = np.bincount(taxonomy.parents[child], weights=cells_per[child],
                                        minlength=sizes[parent]).astype(int)
    # The real sets are LEVEL_0 (neighborhood) .. LEVEL_4 (cluster); neighborhoods are not generated.
    set_label = {level: f"{TAXONOMY_PREFIX}_LEVEL_{n + 1}" for n, level in enumerate(TERM_SETS)}
    term_set = pd.DataFrame({
        "label": [set_label[level] for level in TERM_SETS],
        "name": TERM_SETS,
        "description": [f"{level} level of the consensus taxonomy" for level in TERM_SETS],
        "order": range(len(TERM_SETS)),
        "parent_term_set_label": [""] + [set_label[level] for level in TERM_SETS[:-1]],
    })
    terms = []
    for order, level in enumerate(TERM_SETS):
        above = TERM_SETS[order - 1] if order else None
        for i in range(sizes[level]):
            terms.append({
                "label": taxonomy.labels[level][i],
                "name": taxonomy.names[level][i],
                "cluster_annotation_term_set_label": set_label[level],
                "parent_term_label": taxonomy.labels[above][taxonomy.parents[level][i]] if above else "",
                "parent_term_set_label": set_label[above] if above else "",
                "term_set_order": order,
                "term_order": i,
                "cluster_annotation_term_set_name": level,
                "color_hex_triplet": taxonomy.colors[level][i],
            })
    membership, pivoted, colors = [], [], []
    for cluster in range(sizes["cluster"]):
        lineage = taxonomy.lineage(cluster)
        for level in TERM_SETS:
            node = lineage[level]
            membership.append({
                "cluster_annotation_term_label": taxonomy.labels[level][node],
                "cluster_annotation_term_set_label": set_label[level],
                "cluster_alias": cluster + 1,
                "cluster_annotation_term_name": taxonomy.names[level][node],
                "cluster_annotation_term_set_name": level,
                "number_of_cells": int(cells_per[level][node]),
                "color_hex_triplet": taxonomy.colors[level][node],
            })
        pivoted.append({"cluster_alias": cluster + 1,
                        **{level: taxonomy.names[level][lineage[level]] for level in TERM_SETS}})
        colors.append({"cluster_alias": cluster + 1,
                       **{f"{level}_color": taxonomy.colors[level][lineage[level]] for level in TERM_SETS}})
    return {
        "cluster": pd.DataFrame({"cluster_alias": np.arange(1, sizes["cluster"] + 1),
                                 "label": taxonomy.labels["cluster"],
                                 "number_of_cells": cells_per["cluster"]}),
        "cluster_annotation_term_set": term_set,
        "cluster_annotation_term": pd.DataFrame(terms),
        "cluster_to_cluster_annotation_membership": pd.DataFrame(membership),
        "cluster_to_cluster_annotation_membership_pivoted": pd.DataFrame(pivoted),
        "cluster_to_cluster_annotation_membership_color": pd.DataFrame(colors),
    }


def gene_table(genes: Genes) -> pd.DataFrame:
    return pd.DataFrame({
        "gene_identifier": genes.identifiers,
        "gene_symbol": genes.symbols,
        "name": [f"synthetic gene {s}" for s in genes.symbols],
        "mapped_ncbi_identifier": [f"NCBIGene:{10000 + i}" for i in range(len(genes.symbols))],
        "comment": "",
    })


def sample_tables(cells: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Donor and library tables derived from the cells, as the real metadata directories hold."""
    donor = (cells[["donor_label", "donor_genotype", "donor_sex"]]
             .drop_duplicates("donor_label").sort_values("donor_label"))
    library = (cells[["library_label", "library_method", "region_of_interest_acronym", "donor_label"]]
               .drop_duplicates("library_label").sort_values("library_label"))
    return {"donor": donor, "library": library}


def metadata_cells(cells: DatasetCells) -> pd.DataFrame:
    """The cell_metadata.csv rows: cells that passed QC, in label order."""
    listed = cells.frame[cells.in_metadata]
    return listed.sort_values("cell_label", kind="stable")


def _file_entry(bucket_dir: Path, path: Path, version: str) -> dict:
    rel = path.relative_to(bucket_dir).as_posix()
    return {"version": version, "relative_path": rel, "url": BUCKET_URL + rel,
            "size": path.stat().st_size, "file_hash": md5_of_file(path)}


def build_manifest(bucket_dir: Path, version: str) -> dict:
    """A release manifest of the tree as manifest_builder.py writes it.

    For every ``<kind>/<dataset>/`` the release pins the newest dated directory not newer
    than the release; its files (one level of sub-directories included) are listed with size
    and MD5.
    """
    directory_listing: dict[str, dict] = {}
    file_listing: dict[str, dict] = {}
    for kind_dir in sorted(p for p in bucket_dir.iterdir() if p.is_dir() and p.name != "releases"):
        for dataset_dir in sorted(p for p in kind_dir.iterdir() if p.is_dir()):
            versions = sorted(p.name for p in dataset_dir.iterdir()
                              if p.is_dir() and len(p.name) == 8 and p.name.isdigit() and p.name <= version)
            if not versions:
                continue
            pinned = versions[-1]
            rel = f"{kind_dir.name}/{dataset_dir.name}/{pinned}"
            files = sorted(p for p in (dataset_dir / pinned).rglob("*") if p.is_file())
            directory_listing.setdefault(dataset_dir.name, {"directories": {}})["directories"][kind_dir.name] = {
                "version": pinned, "relative_path": rel, "url": f"{BUCKET_URL}{rel}/",
                "view_link": f"{BUCKET_URL}index.html#{rel}/",
                "total_size": sum(p.stat().st_size for p in files),
            }
            tags = file_listing.setdefault(dataset_dir.name, {}).setdefault(kind_dir.name, {})
            for path in files:
                entry = _file_entry(bucket_dir, path, pinned)
                name = path.name
                if name.endswith(("-raw.h5ad", "-log2.h5ad")):
                    tag, norm = name[: -len(".h5ad")].rsplit("-", 1)
                    tags.setdefault(tag, {})[norm] = {"files": {"h5ad": entry}}
                elif name.endswith(".nii.gz"):
                    tags[name[: -len(".nii.gz")]] = {"files": {"nii.gz": entry}}
                else:
                    stem, _, ext = name.rpartition(".")
                    tags[stem] = {"files": {ext: entry}}
    return {
        "version": version,
        "resource_uri": f"s3://{BUCKET}/",
        "directory_listing": dict(sorted(directory_listing.items())),
        "file_listing": file_listing,
    }


def write_manifest(bucket_dir: Path, version: str) -> Path:
    path = bucket_dir / "releases" / version / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_manifest(bucket_dir, version), indent=4))
    return path


@dataclass
class ReleaseChanges:
    """What the newer release changed in the consensus WMB cell metadata (for diff tests)."""

    reassigned: list[str]
    removed: list[str]
    added: list[str]


def evolve_cells(spec: FixtureSpec, cells: DatasetCells, n_clusters: int) -> tuple[DatasetCells, ReleaseChanges]:
    """The newer release's version of a dataset's cells: re-assign, drop and admit some cells."""
    rng = _rng(spec, f"evolve:{cells.dataset}")
    frame = cells.frame.copy()
    cluster = cells.cluster.copy()
    listed = np.flatnonzero(cells.in_metadata)
    k = max(1, len(listed) // 50)
    moved = rng.choice(listed, size=k, replace=False)
    cluster[moved] = (cluster[moved] + 1 + rng.integers(0, n_clusters - 1, size=k)) % n_clusters
    frame.loc[frame.index[moved], "cluster_alias"] = cluster[moved] + 1
    remaining = np.setdiff1d(listed, moved)
    dropped = rng.choice(remaining, size=max(1, len(listed) // 100), replace=False)
    in_metadata = cells.in_metadata.copy()
    in_metadata[dropped] = False
    unlisted = np.flatnonzero(~cells.in_metadata)
    admitted = unlisted[: max(1, len(unlisted) // 2)] if len(unlisted) else unlisted
    in_metadata[admitted] = True
    labels = frame["cell_label"].to_numpy()
    changes = ReleaseChanges(sorted(labels[moved]), sorted(labels[dropped]), sorted(labels[admitted]))
    return DatasetCells(cells.dataset, cells.matrix_dataset, frame, in_metadata, cluster), changes


def write_metadata_dir(out_dir: Path, cells: DatasetCells, genes: Genes) -> None:
    listed = metadata_cells(cells)
    _write_csv(listed, out_dir / "cell_metadata.csv")
    _write_csv(gene_table(genes), out_dir / "gene.csv")
    for stem, table in sample_tables(listed).items():
        _write_csv(table, out_dir / f"{stem}.csv")


def make_bucket(root: Path, spec: FixtureSpec = FixtureSpec()) -> GeneratedBucket:
    """Write the generated bucket under ``root/allen-brain-cell-atlas`` and its two manifests.

    ``root`` is what ``rclone serve s3`` serves: each folder in it is a bucket.
    """
    root = Path(root)
    bucket_dir = root / BUCKET
    if bucket_dir.exists() and any(bucket_dir.iterdir()):
        raise FileExistsError(f"{bucket_dir} is not empty; generate into a new directory")
    genes = make_genes(spec)
    taxonomy = make_taxonomy(spec)
    n_clusters = spec.taxonomy_sizes["cluster"]
    half = spec.cells // 2
    macosko = make_dataset_cells(spec, MACOSKO, taxonomy, half)
    wmb = make_dataset_cells(spec, CONSENSUS_WMB, taxonomy, spec.cells - half)

    for cells, version in ((macosko, OLD_RELEASE), (wmb, WMB_MATRIX_VERSION)):
        for label, matrix_dataset in sorted(cells.matrix_dataset.items()):
            out_dir = bucket_dir / "expression_matrices" / matrix_dataset / version
            write_matrices(spec, out_dir, cells, genes, taxonomy, label)

    write_metadata_dir(bucket_dir / "metadata" / MACOSKO / OLD_RELEASE, macosko, genes)
    write_metadata_dir(bucket_dir / "metadata" / CONSENSUS_WMB / OLD_RELEASE, wmb, genes)
    counts = np.bincount(metadata_cells(macosko)["cluster_alias"] - 1, minlength=n_clusters) + \
        np.bincount(metadata_cells(wmb)["cluster_alias"] - 1, minlength=n_clusters)
    for stem, table in taxonomy_tables(taxonomy, counts).items():
        _write_csv(table, bucket_dir / "metadata" / TAXONOMY / OLD_RELEASE / f"{stem}.csv")
    write_manifest(bucket_dir, OLD_RELEASE)

    wmb_new, changes = evolve_cells(spec, wmb, n_clusters)
    write_metadata_dir(bucket_dir / "metadata" / CONSENSUS_WMB / NEW_RELEASE, wmb_new, genes)
    write_manifest(bucket_dir, NEW_RELEASE)

    generated = GeneratedBucket(root, spec, [OLD_RELEASE, NEW_RELEASE])
    generated.changes = {CONSENSUS_WMB: changes}
    for release in generated.releases:
        manifest = json.loads((bucket_dir / "releases" / release / "manifest.json").read_text())
        generated.files[release] = sorted(
            entry["relative_path"] for entry in _iter_file_entries(manifest))
    return generated


def _iter_file_entries(manifest: dict) -> Iterator[dict]:
    for kinds in manifest["file_listing"].values():
        for tags in kinds.values():
            for entry in tags.values():
                subs = [entry] if "files" in entry else list(entry.values())
                for sub in subs:
                    yield from sub["files"].values()
