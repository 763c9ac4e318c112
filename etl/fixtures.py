"""A generated ``allen-brain-cell-atlas`` bucket tree, shaped like the real one, for tests and demos.

It follows the real layout (``../shared/abc_layout.md``): ``releases/<date>/manifest.json`` in the
schema ``manifest_builder.py`` writes, metadata CSVs with the real file and column names, and
AnnData ``.h5ad`` matrices (CSR, ``-raw`` counts and ``-log2`` values, split by region, obs indexed
by ``cell_label``, var by ``gene_identifier``) for the consensus mouse datasets and the WMB
matrices they reuse.

The consensus metadata follow the real release file by file and column by column (docs/layout.md):
``cell_metadata.csv`` holds only label, barcode, sample, library, dataset and matrix columns; a
cell's region is its library's (``library.csv``), its donor's sex and age are in ``donor.csv``, its
cluster and 2-D coordinates in the integrated taxonomy's ``cell_to_cluster_membership.csv`` and
``*cell_2d_embedding_coordinates.csv``.

Two releases are written. The newer one pins new dated directories of the consensus AIBS cell
metadata (some cells dropped, some added) and of the taxonomy (those cells, and some re-assigned to
another cluster, in ``cell_to_cluster_membership.csv``) and keeps every other directory, so most
keys are shared between releases exactly as in the real bucket.

Expression is a generative model meant to make aggregation meaningful: every taxonomy node
(class, subclass, supertype, cluster) owns marker genes; a cell's UMIs are drawn from a heavy
tailed background plus its lineage's markers with a per-cell marker share, and library sizes are
log-normal, so counts are sparse and overdispersed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import sqlite3
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

BUCKET = "allen-brain-cell-atlas"
BUCKET_URL = f"https://{BUCKET}.s3.us-west-2.amazonaws.com/"
# The release history, oldest first: before the consensus data, the release that introduced them, one
# that added another dataset only, and one that re-versioned the AIBS cells and the taxonomy.
PRE_CONSENSUS_RELEASE = "20250531"
OLD_RELEASE = "20251031"
UNCHANGED_RELEASE = "20260131"
NEW_RELEASE = "20260331"
RELEASES = [PRE_CONSENSUS_RELEASE, OLD_RELEASE, UNCHANGED_RELEASE, NEW_RELEASE]
CONSENSUS_RELEASES = [OLD_RELEASE, UNCHANGED_RELEASE, NEW_RELEASE]
WMB_MATRIX_VERSION = "20230630"
# The AIBS cells' genes: metadata/WMB-10X/<version>/gene.csv (no gene.csv in Consensus-WMB-AIBS-10X).
WMB_10X = "WMB-10X"
WMB_GENE_VERSION = "20241115"
WMB_GENE_KEY = f"metadata/{WMB_10X}/{WMB_GENE_VERSION}/gene.csv"
WMB_GENE_COLUMNS = ["gene_identifier", "gene_symbol", "name", "mapped_ncbi_identifier", "comment"]

# Directory names as abc_atlas_access's consensus notebooks and client use them (the draft description
# pages call them Consensus-Mouse-*; see docs/layout.md).
MACOSKO = "Consensus-WMB-Macosko-10X"
CONSENSUS_WMB = "Consensus-WMB-AIBS-10X"
TAXONOMY = "Consensus-WMB-integrated-taxonomy"
MACOSKO_MATRIX_PREFIX = "Macosko-10X"
CONSENSUS_DATASETS = [CONSENSUS_WMB, MACOSKO, TAXONOMY]

# The rest of the atlas, tiny (bytes to a few KB a file: only mirrored, never loaded), with real
# dataset names, versions and the real manifests' quirks: sub-folders (views/, geojsons/), kinds
# image_volumes and mapmycells, extensions h5, json, nii.gz, db and geojson, an empty kind entry
# (HMBA-10xMultiome-BG image_volumes: its files lie deeper than the listing reaches) and a
# directory whose total_size is not the sum of its listed files (metadata/WMB-taxonomy/20231215).
WMB_TAXONOMY = "WMB-taxonomy"  # its cluster_alias values overlap the consensus taxonomy's
MERFISH = "MERFISH-C57BL6J-638850"
ALLEN_CCF = "Allen-CCF-2020"
MMC_GENE_MAPPER = "mmc-gene-mapper"
HMBA_BG = "HMBA-10xMultiome-BG"
HMBA_MERSCOPE = "HMBA-MERSCOPE-H22.30.001-BG"
WHB = "WHB-10Xv3"  # human
NEW_DATASET = "Developing-Mouse-Vis-Cortex-10X"  # first listed by UNCHANGED_RELEASE
# dataset -> kind -> directory version
OTHER_DATASETS = {
    WMB_10X: {"metadata": WMB_GENE_VERSION},
    WMB_TAXONOMY: {"metadata": "20231215", "mapmycells": "20240831"},
    MERFISH: {"metadata": "20241115", "expression_matrices": "20230830"},
    ALLEN_CCF: {"image_volumes": "20250331"},
    MMC_GENE_MAPPER: {"mapmycells": "20250630"},
    HMBA_BG: {"metadata": "20250630", "image_volumes": "20250930"},
    HMBA_MERSCOPE: {"image_volumes": "20250630"},
    WHB: {"metadata": "20241115"},
    NEW_DATASET: {"metadata": UNCHANGED_RELEASE},
}

# Region split tags of the real matrices. WMB: the tags both chemistries have come first (10Xv2 alone
# also has Isocortex-3/4, 10Xv3 alone CB, MY, P, PAL, STR).
WMB_REGIONS = ["CTXsp", "HPF", "HY", "MB", "OLF", "TH", "Isocortex-1", "Isocortex-2"]
MACOSKO_REGIONS = ["CB", "HPF", "HY", "Isocortex", "MB", "MY-Pons-BS", "OLF", "PAL", "STR", "TH"]
TERM_SETS = ["class", "subclass", "supertype", "cluster"]  # the hierarchy the expression model follows
TAXONOMY_PREFIX = "CCN20251031"  # term sets
TERM_PREFIX = "CS20251031"  # terms
# The real term sets, in their order: neurotransmitter (flat), then neighborhood > class > ... > cluster.
TERM_SET_LABELS = {"neurotransmitter": f"{TAXONOMY_PREFIX}_NEUR", "neighborhood": f"{TAXONOMY_PREFIX}_LEVEL_0",
                   "class": f"{TAXONOMY_PREFIX}_LEVEL_1", "subclass": f"{TAXONOMY_PREFIX}_LEVEL_2",
                   "supertype": f"{TAXONOMY_PREFIX}_LEVEL_3", "cluster": f"{TAXONOMY_PREFIX}_LEVEL_4"}
TERM_CODES = {"neurotransmitter": "NEUR", "neighborhood": "NEIGH", "class": "CLAS", "subclass": "SUBC",
              "supertype": "SUPT", "cluster": "CLUS"}
# Neighborhood names of the consensus taxonomy (each has a <name>_cell_2d_embedding_coordinates.csv).
NEIGHBORHOODS = ["Pallium-Glut", "Subpallium-GABA", "HY-EA-Glut-GABA", "MB-GABA", "MB-Glut-Dopa-Sero",
                 "NN-IMN", "P-MY-CB-GABA", "P-MY-CB-Glut", "TH-EPI-Glut"]
# 22 neurotransmitter terms as in the real set (21 neurotransmitter types, NN last for non-neuronal
# clusters); a smaller taxonomy uses the first ones and NN.
NEUROTRANSMITTERS = ["Glut", "GABA", "Glut-GABA", "Dopa", "Chol", "Sero", "Nora", "Hist", "GABA-Glyc", "Glut-Chol",
                     "GABA-Chol", "Glut-Dopa", "GABA-Dopa", "Glut-Sero", "GABA-Sero", "Glut-Nora", "GABA-Hist",
                     "Glyc", "Glut-GABA-Dopa", "Dopa-Sero", "Chol-GABA-Glut", "NN"]
# The real taxonomy's level sizes (abc_layout.md); smaller ones keep their proportions.
REAL_TERM_SET_SIZES = {"neurotransmitter": 22, "neighborhood": 9, "class": 43, "subclass": 414, "supertype": 1386,
                       "cluster": 6721}
# cluster_alias values are distinct integers drawn from 1..ALIAS_RANGE (real ones are non-contiguous).
ALIAS_RANGE = 20000
# Genes of views/example_gene_expression.csv (those of them the dataset's gene set has).
EXAMPLE_GENES = ["Snap25", "Slc17a7", "Gad2", "Olig2", "Gfap", "Mbp"]
EMBEDDING = "cell_2d_embedding_coordinates"
# The columns of the real consensus cell_metadata.csv, in their order.
CELL_METADATA_COLUMNS = ["cell_label", "cell_barcode", "barcoded_cell_sample_label", "library_label",
                         "dataset_label", "feature_matrix_label"]
# region_of_interest_acronym of a library, per matrix region (one ROI per region in the generated bucket).
ROI_OF_REGION = {"CTXsp": "CTXsp", "HPF": "RHP", "HY": "HY", "MB": "MB", "OLF": "OLF", "TH": "TH",
                 "Isocortex-1": "MOp", "Isocortex-2": "SSp", "Isocortex": "ACA", "CB": "CB", "MY-Pons-BS": "BS",
                 "PAL": "PAL", "STR": "STR"}
# value_sets.csv colours and CCF identifiers known from the consensus notebook; others are generated.
KNOWN_VALUES = {("donor_sex", "Female"): ("#565353", ""), ("donor_sex", "Male"): ("#ADC4C3", ""),
                ("origin_dataset", "WMB-AIBS"): ("#1f77b4", ""), ("origin_dataset", "WMB-Macosko"): ("#ff7f0e", ""),
                ("anatomical_division_label", "Isocortex"): ("#70FF71", "MBA:315"),
                ("anatomical_division_label", "HPF"): ("#7ED04B", "MBA:1089")}
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
    metadata_only: bool = False  # no consensus/WMB matrices (full-size metadata benchmarks)

    @property
    def taxonomy_sizes(self) -> dict[str, int]:
        """Class/subclass/supertype/cluster counts in the consensus taxonomy's proportions (with 6,721
        clusters exactly the real 43, 414, 1,386)."""
        n, real = self.clusters, REAL_TERM_SET_SIZES
        classes = min(n, max(2, round(n * real["class"] / real["cluster"])))
        subclasses = min(n, max(classes, round(n * real["subclass"] / real["cluster"])))
        supertypes = min(n, max(subclasses, round(n * real["supertype"] / real["cluster"])))
        return {"class": classes, "subclass": subclasses, "supertype": supertypes, "cluster": n}

    @property
    def term_set_sizes(self) -> dict[str, int]:
        """Terms per set, the flat ones too: with 6,721 clusters the real 22 neurotransmitter terms and
        9 neighborhoods; fewer clusters, the same proportions (at least 2, at most the real count)."""
        sizes = self.taxonomy_sizes
        n, real = self.clusters, REAL_TERM_SET_SIZES
        neighborhoods = min(real["neighborhood"], sizes["class"],
                            max(2, round(n * real["neighborhood"] / real["cluster"])))
        transmitters = min(real["neurotransmitter"], max(2, round(n * real["neurotransmitter"] / real["cluster"])))
        return {"neurotransmitter": transmitters, "neighborhood": neighborhoods, **sizes}


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
    neighborhood_of_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    neurotransmitter_of_cluster: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    neighborhood_colors: list[str] = field(default_factory=list)
    neurotransmitter_colors: list[str] = field(default_factory=list)
    neurotransmitter_names: list[str] = field(default_factory=list)
    # cluster_alias of cluster i (distinct, non-contiguous integers); alias_index maps back.
    cluster_alias: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def alias_index(self, aliases: np.ndarray) -> np.ndarray:
        """Cluster indices of cluster_alias values."""
        order = np.argsort(self.cluster_alias)
        return order[np.searchsorted(self.cluster_alias, np.asarray(aliases), sorter=order)]

    def neighborhood(self, cluster: int) -> int:
        return int(self.neighborhood_of_class[self.lineage(cluster)["class"]])

    def lineage(self, cluster: int) -> dict[str, int]:
        out = {"cluster": cluster}
        node = cluster
        for child, parent in zip(TERM_SETS[:0:-1], TERM_SETS[-2::-1], strict=True):
            node = int(self.parents[child][node])
            out[parent] = node
        return out


@dataclass
class Genes:
    """All generated genes; the WMB (AIBS) and Macosko gene sets are overlapping subsets of them.

    The WMB genes are the first ``spec.genes`` (so a WMB matrix column is a gene index); the Macosko
    set is about two thirds as many: the well-known markers, part of the other WMB genes and some
    genes of its own. Marker genes of the taxonomy are shared by both sets.
    """

    identifiers: list[str]
    symbols: list[str]
    background: np.ndarray  # cumulative distribution for background UMIs, over all genes
    wmb: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # gene indices, in var order
    macosko: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))

    def of(self, dataset: str) -> np.ndarray:
        """Gene indices (var order) of a metadata dataset's matrices."""
        return self.macosko if dataset == MACOSKO else self.wmb


@dataclass
class DatasetCells:
    """Cells of one dataset; ``in_metadata`` False marks cells only the matrix has (QC'd out).

    Cell labels and barcodes are ASCII bytes (``S``), one byte a character: as Python strings (~50 bytes
    more each) they took a third of the memory of a full-size run and much of its time went into
    converting them. ``frame`` holds the other per-cell columns, row for row; :func:`metadata_cells`
    gives the whole table with text labels.
    """

    dataset: str
    matrix_dataset: dict[str, str]  # feature_matrix_label -> expression dataset directory
    labels: np.ndarray  # cell_label
    barcodes: np.ndarray  # cell_barcode
    frame: pd.DataFrame
    in_metadata: np.ndarray
    cluster: np.ndarray
    libraries: pd.DataFrame  # library.csv rows (the dataset's real columns)
    donors: pd.DataFrame  # donor.csv rows
    cluster_alias: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # of cluster index
    label_order: np.ndarray | None = None  # stable sort order of labels, kept: each table in label order

    def rows_by_label(self) -> np.ndarray:
        """Rows in cell label order."""
        if self.label_order is None:
            self.label_order = np.argsort(self.labels, kind="stable")
        return self.label_order

    def listed_rows(self) -> np.ndarray:
        """Rows of the cells that passed QC (``in_metadata``), in cell label order."""
        order = self.rows_by_label()
        return order[self.in_metadata[order]]


@dataclass
class GeneratedBucket:
    root: Path
    spec: FixtureSpec
    releases: list[str]  # every release, oldest first
    files: dict[str, list[str]] = field(default_factory=dict)  # release -> relative paths
    changes: dict[str, ReleaseChanges] = field(default_factory=dict)  # NEW_RELEASE vs OLD_RELEASE, per dataset

    @property
    def consensus_releases(self) -> list[str]:
        """The releases that list the consensus data (from OLD_RELEASE on), oldest first."""
        return [r for r in self.releases if r >= OLD_RELEASE]

    @property
    def bucket_dir(self) -> Path:
        return self.root / BUCKET


def _rng(spec: FixtureSpec, stream: str) -> np.random.Generator:
    """Independent stream per component, so growing one part leaves the others unchanged."""
    key = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")
    return np.random.default_rng([spec.seed, key])


def _color(rng: np.random.Generator) -> str:
    return "#" + "".join(f"{v:02X}" for v in rng.integers(0, 256, size=3))


def _gene_sets(spec: FixtureSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gene indices of the WMB set, the Macosko set and the genes both share (markers come from these)."""
    rng = _rng(spec, "genes:sets")
    n = spec.genes
    known = min(len(WELL_KNOWN_GENES), n)
    n_macosko = max(known, round(n * 2 / 3))
    own = min(n_macosko - known, max(1, n // 6)) if n_macosko > known else 0
    others = rng.choice(np.arange(known, n), size=min(n - known, n_macosko - known - own), replace=False)
    shared = np.sort(np.concatenate([np.arange(known), others])).astype(int)
    macosko = np.concatenate([shared, np.arange(n, n + own)]).astype(int)
    return np.arange(n), macosko, shared


def make_genes(spec: FixtureSpec) -> Genes:
    rng = _rng(spec, "genes")
    wmb, macosko, _ = _gene_sets(spec)
    total = int(max(wmb.max(initial=-1), macosko.max(initial=-1))) + 1
    numbers = rng.choice(np.arange(1, 99999), size=total, replace=False)
    numbers = np.concatenate([np.sort(numbers[: spec.genes]), np.sort(numbers[spec.genes:])])
    identifiers = [f"ENSMUSG{n:011d}" for n in numbers]
    symbols = [WELL_KNOWN_GENES[i] if i < len(WELL_KNOWN_GENES) else f"Gm{10000 + i}" if i < spec.genes
               else f"A{830000 + i - spec.genes}Rik" for i in range(total)]
    weights = rng.lognormal(mean=0.0, sigma=2.0, size=total)
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    return Genes(identifiers, symbols, cdf, wmb, macosko)


def _term_labels(level: str, n: int) -> list[str]:
    """Labels of a term set's terms as the consensus taxonomy writes them: CS20251031_CLUS_0001, ..."""
    return [f"{TERM_PREFIX}_{TERM_CODES[level]}_{i + 1:04d}" for i in range(n)]


def make_taxonomy(spec: FixtureSpec) -> Taxonomy:
    rng = _rng(spec, "taxonomy")
    sizes = spec.taxonomy_sizes
    shared = _gene_sets(spec)[2]
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
        labels[level] = _term_labels(level, n)
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
        k = min(markers_per_node[level], len(shared))
        markers[level] = [shared[rng.choice(len(shared), size=k, replace=False)] for _ in range(n)]
    taxonomy = Taxonomy(parents, labels, names, colors, markers)
    # Neighborhoods group classes; every cluster has a neurotransmitter (NN for non-neuronal classes).
    # A separate stream, so the hierarchy and markers above do not depend on them.
    extra = _rng(spec, "taxonomy:neighborhood-neurotransmitter")
    n_neighborhoods = spec.term_set_sizes["neighborhood"]
    taxonomy.neighborhood_of_class = np.sort(np.concatenate([
        np.arange(n_neighborhoods), extra.integers(0, n_neighborhoods, sizes["class"] - n_neighborhoods)]))
    n_transmitters = spec.term_set_sizes["neurotransmitter"]
    taxonomy.neurotransmitter_names = [*NEUROTRANSMITTERS[: n_transmitters - 1], "NN"]
    n_neuronal = n_transmitters - 1
    transmitters = []
    for cluster in range(sizes["cluster"]):
        class_name = names["class"][taxonomy.lineage(cluster)["class"]]
        transmitters.append(n_neuronal if class_name.endswith(" NN") else int(extra.integers(0, n_neuronal)))
    taxonomy.neurotransmitter_of_cluster = np.array(transmitters)
    taxonomy.neighborhood_colors = [_color(extra) for _ in range(n_neighborhoods)]
    taxonomy.neurotransmitter_colors = [_color(extra) for _ in taxonomy.neurotransmitter_names]
    # Non-contiguous cluster_alias values, in no particular order (CLUS_0001 -> e.g. 2721).
    aliases = _rng(spec, "taxonomy:cluster-alias")
    taxonomy.cluster_alias = aliases.choice(np.arange(1, max(ALIAS_RANGE, 3 * sizes["cluster"]) + 1),
                                            size=sizes["cluster"], replace=False).astype(np.int64)
    return taxonomy


def _barcodes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random 16-base barcodes as ASCII bytes (``S16``), made without a Python loop."""
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, size=(n, 16))]
    return np.ascontiguousarray(bases).view("S16").ravel()


def _fit(text: np.ndarray) -> np.ndarray:
    """Fixed-width bytes narrowed to their longest value, the width ``astype(str)`` gives."""
    return text.astype(f"S{max(1, int(np.char.str_len(text).max(initial=0)))}")


def _unique_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels made unique and their stable sort order. Barcodes are random: every later copy of a label
    gets ``-2``, cut to the array's fixed width."""
    order = np.argsort(labels, kind="stable")
    ranked = labels[order]
    repeated = order[1:][ranked[1:] == ranked[:-1]]
    if len(repeated):
        labels = labels.copy()
        labels[repeated] = np.char.add(labels[repeated], b"-2")
        order = np.argsort(labels, kind="stable")
    return labels, order


def _region_of_clusters(rng: np.random.Generator, n_clusters: int, regions: list[str]) -> np.ndarray:
    """Each cluster prefers one region, so region x subclass groups are informative."""
    return rng.integers(0, len(regions), size=n_clusters)


def division_of(region: str) -> str:
    """anatomical_division_label of a matrix region tag (Isocortex-1 -> Isocortex)."""
    return "Isocortex" if region.startswith("Isocortex") else region


def _libraries(rng: np.random.Generator, dataset: str, regions: list[str], chemistries: list[str],
               per_group: int, donors: list[str]) -> pd.DataFrame:
    """library.csv rows: a few libraries per (region, chemistry), each from one donor.

    Labels are shaped like the real ones: ``L8TX_<date>_01_<well>`` (AIBS, with the barcoded cell
    sample ``<plate>_<well>`` its cell labels end with) and ``pBICCNsMMr<ROI>i<donor>d<date><well>``
    (Macosko).
    """
    rows = []
    for region in regions:
        for chemistry in chemistries:
            for _ in range(per_group):
                idx = len(rows)
                donor = donors[int(rng.integers(0, len(donors)))]
                well = f"{chr(65 + idx % 8)}{(idx // 8) % 12 + 1:02d}"
                roi = ROI_OF_REGION[region]
                if dataset == MACOSKO:
                    label = f"pBICCNsMMr{roi}i{donor}d{210101 + idx // 8:06d}{chr(65 + (idx // 4) % 2)}{idx % 4 + 1}"
                    sample = ""
                else:
                    label = f"L8TX_{180101 + idx // 96:06d}_01_{well}"
                    sample = f"{300 + idx // 96:03d}_{well}"
                rows.append({"library_label": label, "library_method": chemistry,
                             "alignment_id": str(1177900000 + 37 * idx), "region_of_interest_acronym": roi,
                             "anatomical_division_label": division_of(region), "donor_label": donor,
                             "barcoded_cell_sample_label": sample, "region": region})
    return pd.DataFrame(rows)


def make_dataset_cells(spec: FixtureSpec, dataset: str, taxonomy: Taxonomy, n_cells: int) -> DatasetCells:
    """A dataset's cells. Labels and barcodes are made as bytes, text columns with few values (library,
    sample, dataset, matrix, region) are categorical: no Python string per cell."""
    rng = _rng(spec, f"cells:{dataset}")
    n_clusters = spec.taxonomy_sizes["cluster"]
    macosko = dataset == MACOSKO
    if macosko:
        regions = MACOSKO_REGIONS[: spec.regions]
        chemistries = ["10Xv3"]
        chemistry = np.zeros(n_cells, dtype=np.int64)  # index into chemistries
        matrix_labels = [f"{MACOSKO_MATRIX_PREFIX}-{r}" for r in regions]
        matrix_dataset = {label: MACOSKO for label in matrix_labels}
        dataset_labels = [MACOSKO]
    else:
        regions = WMB_REGIONS[: spec.regions]
        chemistries = ["10Xv2", "10Xv3"]
        chemistry = (rng.random(n_cells) >= 0.4).astype(np.int64)  # 10Xv2 for 40% of the cells
        matrix_labels = [f"WMB-{c}-{r}" for c in chemistries for r in regions]
        matrix_dataset = {f"WMB-{c}-{r}": f"WMB-{c}" for c in chemistries for r in regions}
        dataset_labels = [f"WMB-{c}" for c in chemistries]
    cluster_weights = rng.lognormal(0.0, 1.0, size=n_clusters)
    cluster = rng.choice(n_clusters, size=n_cells, p=cluster_weights / cluster_weights.sum())
    home = _region_of_clusters(rng, n_clusters, regions)
    at_home = rng.random(n_cells) < 0.75
    region = np.where(at_home, home[cluster], rng.integers(0, len(regions), size=n_cells))  # index into regions
    n_donors = max(2, n_cells // 2000)
    if macosko:
        donors = [f"{'F' if i % 2 == 0 else 'M'}{i + 1:03d}" for i in range(n_donors)]
    else:
        donors = [f"Snap25-IRES2-Cre;Ai14-{400000 + i}" for i in range(n_donors)]
    donor = pd.DataFrame({"donor_label": donors,
                          "donor_sex": ["Female" if i % 2 == 0 else "Male" for i in range(n_donors)]})
    if not macosko:
        donor["donor_age"] = [f"{int(a)} days" for a in rng.integers(51, 72, size=n_donors)]
    donor["origin_dataset"] = "WMB-Macosko" if macosko else "WMB-AIBS"
    per_group = max(2, n_cells // (300 * len(regions) * len(chemistries)))
    libraries = _libraries(rng, dataset, regions, chemistries, per_group, donors)
    # A cell's library is one of its region's and chemistry's: its region is its library's.
    group_of_library = (libraries["region"].map(regions.index) * len(chemistries)
                        + libraries["library_method"].map(chemistries.index)).to_numpy()
    cell_group = region * len(chemistries) + chemistry
    pick = rng.integers(0, per_group, size=n_cells)
    # library_of_pick[group, p]: the library a cell of that group with pick p gets.
    library_of_pick = np.zeros((len(regions) * len(chemistries), per_group), dtype=np.int64)
    for group in range(len(library_of_pick)):
        members = np.flatnonzero(group_of_library == group)
        library_of_pick[group] = members[np.arange(per_group) % len(members)]
    library_index = library_of_pick[cell_group, pick]
    sample_code, samples = pd.factorize(libraries["barcoded_cell_sample_label"])
    barcode = _barcodes(rng, n_cells)
    if macosko:
        library_text = _fit(np.array(libraries["library_label"].tolist(), dtype="S")[library_index])
        cell_label = np.char.add(np.char.add(library_text, b"_"), barcode)
    else:
        sample_text = _fit(np.array(libraries["barcoded_cell_sample_label"].tolist(), dtype="S")[library_index])
        cell_label = np.char.add(np.char.add(barcode, b"-"), sample_text)
    cell_label, label_order = _unique_labels(cell_label)
    # 2-D embeddings: cells gather around their cluster, in the global and their neighborhood's one.
    centres = rng.normal(0, 10, size=(n_clusters, 4))
    spread = rng.normal(0, 0.6, size=(n_cells, 4))
    coordinates = np.round(centres[cluster] + spread, 6)
    frame = pd.DataFrame({
        "barcoded_cell_sample_label": pd.Categorical.from_codes(sample_code[library_index], samples),
        "library_label": pd.Categorical.from_codes(library_index, libraries["library_label"]),
        "dataset_label": pd.Categorical.from_codes(chemistry if not macosko else np.zeros(n_cells, dtype=np.int64),
                                                   dataset_labels),
        "feature_matrix_label": pd.Categorical.from_codes(chemistry * len(regions) + region, matrix_labels),
        # Not in cell_metadata.csv (see CELL_METADATA_COLUMNS): the generator's own bookkeeping.
        "region": pd.Categorical.from_codes(region, regions),
        "x": coordinates[:, 0], "y": coordinates[:, 1],
        "neighborhood_x": coordinates[:, 2], "neighborhood_y": coordinates[:, 3],
    })
    in_metadata = rng.random(n_cells) >= spec.qc_dropped_fraction
    return DatasetCells(dataset, matrix_dataset, cell_label, barcode, frame, in_metadata, cluster,
                        libraries.drop(columns=["barcoded_cell_sample_label", "region"]), donor,
                        taxonomy.cluster_alias, label_order)


def _draw_counts(
    spec: FixtureSpec, rng: np.random.Generator, genes: Genes, taxonomy: Taxonomy,
    clusters: np.ndarray, depth: float,
) -> sp.csr_matrix:
    """UMI counts for a block of cells, as CSR (cells x all genes), without a dense matrix."""
    n = len(clusters)
    totals = np.maximum(50, rng.lognormal(np.log(depth), 0.45, size=n)).astype(np.int64)
    marker_share = rng.beta(2.0, 5.0, size=n)
    n_marker = rng.binomial(totals, marker_share)
    n_background = totals - n_marker
    rows_bg = np.repeat(np.arange(n), n_background)
    cols_bg = np.searchsorted(genes.background, rng.random(int(n_background.sum())), side="right")
    cols_bg = np.minimum(cols_bg, len(genes.identifiers) - 1)
    rows_mk, cols_mk = [], []
    for i, cluster in enumerate(clusters):
        lineage = taxonomy.lineage(int(cluster))
        pool = np.concatenate([taxonomy.markers[level][lineage[level]] for level in TERM_SETS])
        rows_mk.append(np.full(n_marker[i], i))
        cols_mk.append(pool[rng.integers(0, len(pool), size=n_marker[i])])
    rows = np.concatenate([rows_bg, *rows_mk])
    cols = np.concatenate([cols_bg, *cols_mk])
    counts = sp.coo_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                           shape=(n, len(genes.identifiers))).tocsr()
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
    chosen = chosen[np.argsort(cells.labels[chosen], kind="stable")]
    obs = pd.DataFrame(index=pd.Index(np.char.decode(cells.labels[chosen], "ascii"), name="cell_label"))
    columns = genes.of(cells.dataset)
    symbols = np.array(genes.symbols)[columns]
    var = pd.DataFrame({"gene_symbol": symbols},
                       index=pd.Index(np.array(genes.identifiers)[columns], name="gene_identifier"))
    examples = {symbol: int(np.flatnonzero(symbols == symbol)[0]) for symbol in EXAMPLE_GENES if symbol in symbols}
    example_values = np.full((len(chosen), len(examples)), np.nan)
    depth = spec.umis_per_cell * (0.6 if "10Xv2" in matrix_label else 1.0)
    rng = _rng(spec, f"counts:{matrix_label}")
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = H5adAppender(out_dir / f"{matrix_label}-raw.h5ad", obs, var)
    log2 = H5adAppender(out_dir / f"{matrix_label}-log2.h5ad", obs, var)
    for part in _blocks(len(chosen), block_cells):
        block = _draw_counts(spec, rng, genes, taxonomy, cells.cluster[chosen[part]], depth)[:, columns]
        block.sort_indices()
        raw.append(block)
        normalised = log2_cpm(block)
        log2.append(normalised)
        example_values[part] = normalised[:, list(examples.values())].toarray()
    raw.close()
    log2.close()
    # log2 values of EXAMPLE_GENES, for views/example_gene_expression.csv (NaN for cells of other matrices).
    for i, symbol in enumerate(examples):
        frame.loc[frame.index[chosen], f"example:{symbol}"] = np.round(example_values[:, i], 4)
    return [raw.path, log2.path]


# A file's (size, mtime_ns) and MD5: the manifests of a bucket's releases list most files again.
FileHashes = dict[Path, tuple[tuple[int, int], str]]


def _file_state(path: Path) -> tuple[int, int]:
    """What tells that a file changed since it was hashed."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


# Tables of at least this many rows are written by the direct CSV writer (smaller ones by pandas).
DIRECT_CSV_MIN_ROWS = 10_000
CSV_BLOCK_ROWS = 1 << 19  # rows formatted and written at a time by the direct writer
FLOAT_WIDTH = 24  # the longest repr of a float64 ('-2.2250738585072014e-308')
COMMA, NEWLINE = ord(","), ord("\n")


class _LeftToPandas(Exception):
    """A table the direct CSV writer does not write (a field needing quotes, non-ASCII text, a type
    it does not format): pandas writes it instead."""


@numba.njit(cache=True, nogil=True)
def _put_digits(row: np.ndarray, start: int, number: int) -> int:
    """The decimal digits of ``number`` >= 0 into ``row`` from ``start``; returns the position after them."""
    digits, rest = 1, number // 10
    while rest:
        digits += 1
        rest //= 10
    for k in range(digits - 1, -1, -1):
        row[start + k] = 48 + number % 10
        number //= 10
    return start + digits


@numba.njit(cache=True, nogil=True)
def _format_integers(values: np.ndarray, text: np.ndarray, lengths: np.ndarray) -> None:
    """int64 values (none the minimum) as decimal text, one row of ``text`` each."""
    for i in range(len(values)):
        value, start = values[i], 0
        if value < 0:
            text[i, 0] = 45  # '-'
            value, start = -value, 1
        lengths[i] = _put_digits(text[i], start, value)


@numba.njit(cache=True, nogil=True)
def _format_fixed(values: np.ndarray, text: np.ndarray, lengths: np.ndarray, done: np.ndarray) -> None:
    """float64 values as Python's repr writes them, for those that are a whole number of millionths
    (what ``np.round(v, d)`` gives for d <= 6) between 1e-4 and 1e9 in size, or zero, or NaN (empty,
    as pandas writes it); ``done`` is False for the others.

    Such a value is the double nearest to its decimal k/10**6 of at most 15 significant digits, so
    its shortest round-tripping repr is that decimal without trailing zeros, in fixed notation.
    """
    for i in range(len(values)):
        value = values[i]
        if np.isnan(value):
            lengths[i], done[i] = 0, True
            continue
        millionths = np.rint(value * 1e6)
        size = abs(millionths)
        if millionths / 1e6 != value or not (size == 0 or 100 <= size < 1e15):
            done[i] = False
            continue
        row, start = text[i], 0
        if math.copysign(1.0, value) < 0:
            row[0] = 45  # '-' (also of -0.0)
            start = 1
        whole, fraction = divmod(int(size), 1_000_000)
        start = _put_digits(row, start, whole)
        row[start] = 46  # '.'
        start += 1
        if fraction == 0:
            row[start] = 48
            start += 1
        else:
            digits = 6
            while fraction % 10 == 0:
                fraction //= 10
                digits -= 1
            for k in range(digits - 1, -1, -1):
                row[start + k] = 48 + fraction % 10
                fraction //= 10
            start += digits
        lengths[i], done[i] = start, True


# Bytes that make pandas quote a field: comma, double quote, line feed, carriage return.
QUOTED_BYTES = np.isin(np.arange(256), [ord(c) for c in ',"\n\r'])


@numba.njit(cache=True, nogil=True)
def _put_fields(out: np.ndarray, position: np.ndarray, text: np.ndarray, lengths: np.ndarray,
                separator: int, quoted: np.ndarray) -> bool:
    """Append each row's field and ``separator`` at ``position`` (advanced); False, and stop, at a
    field pandas would quote (one holding a byte ``quoted`` marks)."""
    for i in range(len(position)):
        start, length = position[i], lengths[i]
        for k in range(length):
            byte = text[i, k]
            if quoted[byte]:
                return False
            out[start + k] = byte
        out[start + length] = separator
        position[i] = start + length + 1
    return True


def _bytes_field(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-width bytes as (one row of bytes a value, its length)."""
    text = np.ascontiguousarray(text)
    return text.view(np.uint8).reshape(len(text), text.itemsize), np.char.str_len(text).astype(np.int64)


def _string_bytes(values: np.ndarray) -> np.ndarray:
    """str objects (None/NaN as empty, as pandas writes them) as ASCII bytes."""
    if pd.api.types.infer_dtype(values, skipna=False) != "string":  # some missing, or not all str
        if pd.api.types.infer_dtype(values, skipna=True) not in ("string", "empty"):
            raise _LeftToPandas
        values = np.where(pd.isna(values), "", values)
    try:
        return values.astype("S")
    except UnicodeEncodeError:
        raise _LeftToPandas from None


def _field_formatter(values: np.ndarray | pd.Categorical) -> Callable[[slice], tuple[np.ndarray, np.ndarray]]:
    """A function giving the CSV fields of a block of rows of one column, as pandas writes them."""
    if isinstance(values, pd.Categorical):
        categories = values.categories.to_numpy()
        if categories.dtype.kind not in "OU":
            raise _LeftToPandas
        # Code -1 (missing) takes the last entry: empty.
        names = np.append(_string_bytes(categories.astype(object)), np.array([b""]))
        codes = values.codes
        return lambda part: _bytes_field(names[codes[part]])
    kind = values.dtype.kind
    if kind == "S":
        return lambda part: _bytes_field(values[part])
    if kind == "O":
        return lambda part: _bytes_field(_string_bytes(values[part]))
    if kind == "b":
        return lambda part: _bytes_field(values[part].astype("S"))
    if kind in "iu" and (len(values) == 0 or np.iinfo(np.int64).min < values.min()
                         and values.max() <= np.iinfo(np.int64).max):
        def integers(part: slice) -> tuple[np.ndarray, np.ndarray]:
            block = values[part].astype(np.int64)
            text, lengths = np.empty((len(block), 20), dtype=np.uint8), np.empty(len(block), dtype=np.int64)
            _format_integers(block, text, lengths)
            return text, lengths
        return integers
    if values.dtype == np.float64:
        def floats(part: slice) -> tuple[np.ndarray, np.ndarray]:
            block = values[part]
            text, lengths = np.empty((len(block), FLOAT_WIDTH), dtype=np.uint8), np.empty(len(block), dtype=np.int64)
            done = np.empty(len(block), dtype=np.bool_)
            _format_fixed(block, text, lengths, done)
            rest = np.flatnonzero(~done)
            if len(rest):  # numpy's float to text is Python's repr
                text[rest], lengths[rest] = _bytes_field(block[rest].astype(f"S{FLOAT_WIDTH}"))
            return text, lengths
        return floats
    raise _LeftToPandas


def _csv_block(fields: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """CSV lines of a block of rows from each column's (bytes, lengths)."""
    if len(fields) == 1 and (fields[0][1] == 0).any():
        raise _LeftToPandas  # the csv module writes a lone empty field as ""
    line_lengths = sum(lengths for _, lengths in fields) + len(fields)
    out = np.empty(int(line_lengths.sum()), dtype=np.uint8)
    position = np.concatenate([[0], np.cumsum(line_lengths)[:-1]]).astype(np.int64)
    for i, (text, lengths) in enumerate(fields):
        if not _put_fields(out, position, text, lengths, NEWLINE if i == len(fields) - 1 else COMMA, QUOTED_BYTES):
            raise _LeftToPandas
    return out


def _write_columns(path: Path, columns: dict[str, np.ndarray | pd.Categorical]) -> str:
    """Write the columns (equal lengths) as CSV, as pandas would, block by block, and return the
    file's MD5; raises _LeftToPandas (leaving a partial file) when a field needs what only pandas
    does. A thread writes and hashes a block while the next one is formatted."""
    names = list(columns)
    if not names or any(c in name for name in names for c in ',"\n\r') or names == [""]:
        raise _LeftToPandas
    formatters = [_field_formatter(values) for values in columns.values()]
    n_rows = len(next(iter(columns.values())))
    digest = hashlib.md5()

    def put(data: bytes | np.ndarray) -> None:
        handle.write(data)
        digest.update(data)

    with open(path, "wb") as handle, ThreadPoolExecutor(max_workers=1) as writer:
        pending = writer.submit(put, (",".join(names) + "\n").encode())
        for part in _blocks(n_rows, CSV_BLOCK_ROWS):
            block = _csv_block([formatter(part) for formatter in formatters])
            pending.result()
            pending = writer.submit(put, block)
        pending.result()
    return digest.hexdigest()


def _write_table(path: Path, columns: dict[str, np.ndarray | pd.Categorical], hashes: FileHashes | None = None) -> None:
    """Write columns (numpy arrays, ``S`` ones ASCII text, or categoricals) as CSV, atomically, as
    pandas' ``to_csv(index=False, lineterminator="\\n")`` writes them: numba formats numbers and
    joins fields block by block, so memory stays at a block and millions of rows take seconds. Tables
    of fewer than DIRECT_CSV_MIN_ROWS rows, and those with fields to quote, are written by pandas.
    ``hashes`` gets the MD5 of a file written directly (computed while writing it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n_rows = len(next(iter(columns.values()))) if columns else 0
    md5 = None
    try:
        if n_rows < DIRECT_CSV_MIN_ROWS:
            raise _LeftToPandas
        md5 = _write_columns(tmp, columns)
    except _LeftToPandas:
        frame = pd.DataFrame({name: np.char.decode(values, "ascii")
                              if isinstance(values, np.ndarray) and values.dtype.kind == "S" else values
                              for name, values in columns.items()})
        frame.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)
    if md5 is not None and hashes is not None:
        hashes[path] = (_file_state(path), md5)


def _column_at(column: pd.Series, rows: np.ndarray) -> np.ndarray | pd.Categorical:
    """A frame column's values at ``rows``, for _write_table."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.array[rows]
    return column.to_numpy()[rows]


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` as pandas' ``to_csv(index=False)`` would (see _write_table), atomically."""
    if (len(frame) < DIRECT_CSV_MIN_ROWS or not frame.columns.is_unique
            or not all(isinstance(name, str) for name in frame.columns)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        frame.to_csv(tmp, index=False, lineterminator="\n")
        os.replace(tmp, path)
        return
    _write_table(path, {name: column.array if isinstance(column.dtype, pd.CategoricalDtype)
                        else column.to_numpy() for name, column in frame.items()})


def taxonomy_tables(taxonomy: Taxonomy, cluster_cells: np.ndarray) -> dict[str, pd.DataFrame]:
    """The consensus taxonomy's CSV tables, keyed by file stem, with the real columns.

    Term sets: neurotransmitter (flat), neighborhood > class > subclass > supertype > cluster.
    ``cluster.csv`` carries the cell counts; the membership table maps every cluster to its term of
    every set (the cell counts and colours of the terms live in ``cluster.csv`` and
    ``cluster_annotation_term.csv``).
    """
    sizes = {level: len(taxonomy.labels[level]) for level in TERM_SETS}
    sets = ["neurotransmitter", "neighborhood", *TERM_SETS]
    parent_set = {"neurotransmitter": None, "neighborhood": None, "class": "neighborhood", "subclass": "class",
                  "supertype": "subclass", "cluster": "supertype"}
    labels = {**taxonomy.labels,
              "neighborhood": _term_labels("neighborhood", len(taxonomy.neighborhood_colors)),
              "neurotransmitter": _term_labels("neurotransmitter", len(taxonomy.neurotransmitter_names))}
    names = {**taxonomy.names, "neighborhood": NEIGHBORHOODS[: len(taxonomy.neighborhood_colors)],
             "neurotransmitter": taxonomy.neurotransmitter_names}
    colors = {**taxonomy.colors, "neighborhood": taxonomy.neighborhood_colors,
              "neurotransmitter": taxonomy.neurotransmitter_colors}
    parents = {**taxonomy.parents, "class": taxonomy.neighborhood_of_class}
    term_set = pd.DataFrame({
        "label": [TERM_SET_LABELS[s] for s in sets],
        "name": sets,
        "description": sets,
        "order": range(len(sets)),
        "parent_term_set_label": [TERM_SET_LABELS[parent_set[s]] if parent_set[s] else "" for s in sets],
    })
    terms = []
    for order, level in enumerate(sets):
        above = parent_set[level]
        for i in range(len(labels[level])):
            parent = int(parents[level][i]) if above else None
            terms.append({
                "label": labels[level][i],
                "name": names[level][i],
                "cluster_annotation_term_set_label": TERM_SET_LABELS[level],
                "cluster_annotation_term_set_name": level,
                "color_hex_triplet": colors[level][i],
                "term_order": i + 1,
                "term_set_order": order,
                "parent_term_label": labels[above][parent] if above else "",
                "parent_term_name": names[above][parent] if above else "",
                "parent_term_set_label": TERM_SET_LABELS[above] if above else "",
            })
    membership = []
    for level in sets:
        for cluster in range(sizes["cluster"]):
            if level == "neurotransmitter":
                node = int(taxonomy.neurotransmitter_of_cluster[cluster])
            elif level == "neighborhood":
                node = taxonomy.neighborhood(cluster)
            else:
                node = taxonomy.lineage(cluster)[level]
            membership.append({
                "cluster_annotation_term_label": labels[level][node],
                "cluster_annotation_term_set_name": level,
                "cluster_annotation_term_name": names[level][node],
                "cluster_alias": int(taxonomy.cluster_alias[cluster]),
                "cluster_annotation_term_set_label": TERM_SET_LABELS[level],
            })
    return {
        "cluster": pd.DataFrame({"label": taxonomy.labels["cluster"],
                                 "cluster_alias": taxonomy.cluster_alias,
                                 "number_of_cells": cluster_cells}),
        "cluster_annotation_term_set": term_set,
        "cluster_annotation_term": pd.DataFrame(terms),
        "cluster_to_cluster_annotation_membership": pd.DataFrame(membership),
    }


def gene_table(genes: Genes) -> pd.DataFrame:
    """gene.csv of the consensus Macosko metadata: only identifier and symbol, the Macosko genes."""
    return pd.DataFrame({"gene_identifier": np.array(genes.identifiers)[genes.macosko],
                         "gene_symbol": np.array(genes.symbols)[genes.macosko]})


def wmb_gene_table(genes: Genes) -> pd.DataFrame:
    """metadata/WMB-10X/<version>/gene.csv: the WMB genes (those of the WMB-10Xv2/v3 matrices), with
    the real file's columns."""
    identifiers = np.array(genes.identifiers)[genes.wmb]
    symbols = np.array(genes.symbols)[genes.wmb]
    return pd.DataFrame({
        "gene_identifier": identifiers,
        "gene_symbol": symbols,
        "name": [f"{s} gene" if s in WELL_KNOWN_GENES else f"predicted gene {s[2:]}" for s in symbols],
        "mapped_ncbi_identifier": [f"NCBIGene:{int(i[7:]) % 900000 + 11000}" for i in identifiers],
        "comment": "",
    })


def sample_tables(cells: DatasetCells) -> dict[str, pd.DataFrame]:
    """donor.csv and library.csv of a dataset, with the columns the real directory has."""
    library = cells.libraries.sort_values("library_label", kind="stable")
    if cells.dataset == MACOSKO:
        library = library.drop(columns=["library_method", "alignment_id"])
    return {"donor": cells.donors.sort_values("donor_label", kind="stable"), "library": library}


def value_sets(cells: DatasetCells) -> pd.DataFrame:
    """value_sets.csv: order, colour and identifiers of the categorical values of donor and library."""
    divisions = ["Isocortex", "OLF", "HPF", "CTXsp", "STR", "PAL", "TH", "HY", "MB", "MY-Pons-BS", "CB"]
    used = [d for d in divisions if d in set(cells.libraries["anatomical_division_label"])]
    rows = []
    for field_name, table, values in (
            ("donor_sex", "donor", ["Female", "Male"]),
            ("origin_dataset", "donor", ["WMB-AIBS", "WMB-Macosko"]),
            ("anatomical_division_label", "library", used)):
        for value in values:
            color, identifier = KNOWN_VALUES.get((field_name, value), (None, ""))
            if color is None:
                digest = hashlib.md5(f"{field_name}:{value}".encode()).hexdigest()
                color = "#" + digest[:6].upper()
            order = divisions.index(value) + 1 if field_name == "anatomical_division_label" else values.index(value) + 1
            description = {"WMB-AIBS": "Allen Institute for Brain Science, Whole Mouse Brain",
                           "WMB-Macosko": "Broad Institute, Macosko lab Whole Mouse Brain"}.get(value, value)
            rows.append({"label": value, "field": field_name, "table": table, "description": description,
                         "order": order, "external_identifier": identifier, "parent_label": "",
                         "color_hex_triplet": color,
                         "comment": "division, ID and parent from CCF-2020"
                         if field_name == "anatomical_division_label" else ""})
    return pd.DataFrame(rows)


def metadata_cells(cells: DatasetCells) -> pd.DataFrame:
    """The cells that passed QC, in label order, with the generator's bookkeeping columns."""
    rows = cells.listed_rows()
    listed = cells.frame.take(rows)
    listed.insert(0, "cell_label", np.char.decode(cells.labels[rows], "ascii"))
    listed.insert(1, "cell_barcode", np.char.decode(cells.barcodes[rows], "ascii"))
    return listed.assign(cluster_alias=cells.cluster_alias[cells.cluster[rows]])


def _file_entry(bucket_dir: Path, path: Path, version: str, hashes: FileHashes) -> dict:
    rel = path.relative_to(bucket_dir).as_posix()
    state = _file_state(path)
    if path not in hashes or hashes[path][0] != state:
        hashes[path] = (state, md5_of_file(path))
    return {"version": version, "relative_path": rel, "url": BUCKET_URL + rel,
            "size": state[0], "file_hash": hashes[path][1]}


def build_manifest(bucket_dir: Path, version: str, hashes: FileHashes | None = None) -> dict:
    """A release manifest of the tree as manifest_builder.py writes it.

    For every ``<kind>/<dataset>/`` the release pins the newest dated directory not newer
    than the release; its files (one level of sub-directories included) are listed with size
    and MD5. ``total_size`` counts every file below the directory, deeper ones too, so a directory
    with deeper files has a total that is not the sum of its listed files, or an empty ``{}``
    listing (as ``HMBA-10xMultiome-BG`` ``image_volumes`` in the real 20260711 manifest). ``hashes``
    keeps the MD5 of files already hashed (by their size and mtime) for the next manifest.
    """
    hashes = {} if hashes is None else hashes
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
            every = sorted(p for p in (dataset_dir / pinned).rglob("*") if p.is_file())
            files = [p for p in every if len(p.relative_to(dataset_dir / pinned).parts) <= 2]
            directory_listing.setdefault(dataset_dir.name, {"directories": {}})["directories"][kind_dir.name] = {
                "version": pinned, "relative_path": rel, "url": f"{BUCKET_URL}{rel}/",
                "view_link": f"{BUCKET_URL}index.html#{rel}/",
                "total_size": sum(p.stat().st_size for p in every),
            }
            tags = file_listing.setdefault(dataset_dir.name, {}).setdefault(kind_dir.name, {})
            for path in files:
                entry = _file_entry(bucket_dir, path, pinned, hashes)
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


def write_manifest(bucket_dir: Path, version: str, hashes: FileHashes | None = None) -> Path:
    path = bucket_dir / "releases" / version / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_manifest(bucket_dir, version, hashes), indent=4))
    return path


@dataclass
class ReleaseChanges:
    """What the newer release changed in the consensus WMB cells (for diff tests): cells re-assigned
    to another cluster (cell_to_cluster_membership.csv), dropped and added (cell_metadata.csv)."""

    reassigned: list[str]
    removed: list[str]
    added: list[str]


def evolve_cells(spec: FixtureSpec, cells: DatasetCells, n_clusters: int) -> tuple[DatasetCells, ReleaseChanges]:
    """The newer release's version of a dataset's cells: re-assign, drop and admit some cells."""
    rng = _rng(spec, f"evolve:{cells.dataset}")
    cluster = cells.cluster.copy()
    listed = np.flatnonzero(cells.in_metadata)
    k = max(1, len(listed) // 50)
    moved = rng.choice(listed, size=k, replace=False)
    cluster[moved] = (cluster[moved] + 1 + rng.integers(0, n_clusters - 1, size=k)) % n_clusters
    still_listed = cells.in_metadata.copy()
    still_listed[moved] = False
    remaining = np.flatnonzero(still_listed)  # listed but not moved, in order
    dropped = rng.choice(remaining, size=max(1, len(listed) // 100), replace=False)
    in_metadata = cells.in_metadata.copy()
    in_metadata[dropped] = False
    unlisted = np.flatnonzero(~cells.in_metadata)
    admitted = unlisted[: max(1, len(unlisted) // 2)] if len(unlisted) else unlisted
    in_metadata[admitted] = True
    changes = ReleaseChanges(*(sorted(np.char.decode(cells.labels[rows], "ascii").tolist())
                               for rows in (moved, dropped, admitted)))
    return DatasetCells(cells.dataset, cells.matrix_dataset, cells.labels, cells.barcodes, cells.frame.copy(),
                        in_metadata, cluster, cells.libraries, cells.donors, cells.cluster_alias,
                        cells.label_order), changes


def write_metadata_dir(out_dir: Path, cells: DatasetCells, genes: Genes | None,
                       hashes: FileHashes | None = None) -> None:
    """A consensus dataset's metadata directory: cell_metadata, donor, library, value_sets,
    views/example_gene_expression and, for Macosko only, gene (the AIBS cells' genes are in
    metadata/WMB-10X/<version>/gene.csv). ``hashes`` gets the MD5 of the cell tables."""
    rows = cells.listed_rows()
    text = {"cell_label": cells.labels, "cell_barcode": cells.barcodes}
    listed = {name: text[name][rows] if name in text else _column_at(cells.frame[name], rows)
              for name in CELL_METADATA_COLUMNS}
    _write_table(out_dir / "cell_metadata.csv", listed, hashes)
    examples = {name.removeprefix("example:"): cells.frame[name].to_numpy()[rows]
                for name in cells.frame.columns if name.startswith("example:")}
    _write_table(out_dir / "views" / "example_gene_expression.csv",
                 {"cell_label": listed["cell_label"], **{k: v for k, v in examples.items() if not np.isnan(v).any()}},
                 hashes)
    for stem, table in sample_tables(cells).items():
        _write_csv(table, out_dir / f"{stem}.csv")
    _write_csv(value_sets(cells), out_dir / "value_sets.csv")
    if genes is not None:
        _write_csv(gene_table(genes), out_dir / "gene.csv")


def write_taxonomy_dir(out_dir: Path, taxonomy: Taxonomy, datasets: list[DatasetCells],
                       hashes: FileHashes | None = None) -> None:
    """The integrated taxonomy directory: taxonomy tables, cell_to_cluster_membership and the 2-D
    embeddings (all cells, and each neighborhood's cells) of the cells the datasets list. ``hashes``
    gets the MD5 of the cell tables."""
    parts = [(cells, cells.listed_rows()) for cells in datasets]
    labels = np.concatenate([cells.labels[rows] for cells, rows in parts])
    # Each dataset's rows are in label order already: a stable sort merges them.
    order = np.argsort(labels, kind="stable")
    labels = labels[order]
    cluster = np.concatenate([cells.cluster[rows] for cells, rows in parts])[order]

    def column(name: str) -> np.ndarray:
        return np.concatenate([cells.frame[name].to_numpy()[rows] for cells, rows in parts])[order]

    n_clusters = len(taxonomy.labels["cluster"])
    for stem, table in taxonomy_tables(taxonomy, np.bincount(cluster, minlength=n_clusters)).items():
        _write_csv(table, out_dir / f"{stem}.csv")
    _write_table(out_dir / "cell_to_cluster_membership.csv",
                 {"cell_label": labels, "cluster_alias": taxonomy.cluster_alias[cluster]}, hashes)
    _write_table(out_dir / f"{EMBEDDING}.csv", {"cell_label": labels, "x": column("x"), "y": column("y")}, hashes)
    neighborhood = np.array([taxonomy.neighborhood(c) for c in range(n_clusters)], dtype=int)[cluster]
    x, y = column("neighborhood_x"), column("neighborhood_y")
    for i in range(len(taxonomy.neighborhood_colors)):
        rows = np.flatnonzero(neighborhood == i)
        _write_table(out_dir / f"{NEIGHBORHOODS[i]}_{EMBEDDING}.csv",
                     {"cell_label": labels[rows], "x": x[rows], "y": y[rows]}, hashes)


def _write_bytes(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _nifti_gz(rng: np.random.Generator, shape: tuple[int, int, int]) -> bytes:
    """A tiny NIfTI-1 volume (uint8), gzipped without a timestamp."""
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *shape, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 2, 8)  # datatype uint8, bitpix
    struct.pack_into("<8f", header, 76, 1.0, 25.0, 25.0, 25.0, 0, 0, 0, 0)
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    header[344:348] = b"n+1\0"
    voxels = rng.integers(0, 8, size=shape, dtype=np.uint8).tobytes(order="F")
    return gzip.compress(bytes(header) + voxels, mtime=0)


def _write_h5(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as handle:
        for name, values in arrays.items():
            handle.create_dataset(name, data=values, track_times=False)
    os.replace(tmp, path)


def _write_sqlite(path: Path, genes: Genes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(tmp)) as conn:
        conn.execute("CREATE TABLE gene (identifier TEXT PRIMARY KEY, symbol TEXT, species TEXT)")
        conn.executemany("INSERT INTO gene VALUES (?, ?, 'Mus musculus')",
                         zip(genes.identifiers[:20], genes.symbols[:20], strict=True))
        conn.commit()
    os.replace(tmp, path)


def _other_taxonomy(spec: FixtureSpec, taxonomy: Taxonomy) -> dict[str, pd.DataFrame]:
    """WMB-taxonomy's tables (CCN20230722): a few clusters, half of them with a cluster_alias that the
    consensus taxonomy also uses (the real taxonomies' aliases overlap)."""
    rng = _rng(spec, f"other:{WMB_TAXONOMY}")
    n = 8
    shared = rng.choice(taxonomy.cluster_alias, size=min(n // 2, len(taxonomy.cluster_alias)), replace=False)
    free = np.setdiff1d(np.arange(1, ALIAS_RANGE + 1), taxonomy.cluster_alias)
    aliases = np.concatenate([shared, rng.choice(free, size=n - len(shared), replace=False)]).astype(np.int64)
    levels = {"class": 2, "subclass": 4, "cluster": n}
    codes = {"class": "CLAS", "subclass": "SUBC", "cluster": "CLUS"}
    set_label = {level: f"CCN20230722_{codes[level]}" for level in levels}
    labels = {level: [f"CS20230722_{codes[level]}_{i + 1:04d}" for i in range(k)] for level, k in levels.items()}
    parent = {"subclass": np.array([0, 0, 1, 1]), "cluster": np.arange(n) // 2}
    subclasses = ["001 CLA-EPd-CTX Car3 Glut", "002 IT EP-CLA Glut", "318 Astro-NT NN", "319 Astro-TE NN"]
    names = {"class": ["01 IT-ET Glut", "30 Astro-Epen"], "subclass": subclasses,
             "cluster": [f"{i + 1:04d} {subclasses[parent['cluster'][i]].split(' ', 1)[1]}_{i + 1}" for i in range(n)]}
    above = {"class": None, "subclass": "class", "cluster": "subclass"}
    terms, membership = [], []
    for order, (level, k) in enumerate(levels.items()):
        for i in range(k):
            up = above[level]
            j = int(parent[level][i]) if up else None
            terms.append({"label": labels[level][i], "name": names[level][i],
                          "cluster_annotation_term_set_label": set_label[level],
                          "cluster_annotation_term_set_name": level, "color_hex_triplet": _color(rng),
                          "term_order": i + 1, "term_set_order": order,
                          "parent_term_label": labels[up][j] if up else "",
                          "parent_term_name": names[up][j] if up else "",
                          "parent_term_set_label": set_label[up] if up else ""})
    for level in levels:
        for c in range(n):
            node = c if level == "cluster" else int(parent["cluster"][c]) if level == "subclass" else \
                int(parent["subclass"][parent["cluster"][c]])
            membership.append({"cluster_annotation_term_label": labels[level][node],
                               "cluster_annotation_term_set_name": level,
                               "cluster_annotation_term_name": names[level][node], "cluster_alias": int(aliases[c]),
                               "cluster_annotation_term_set_label": set_label[level]})
    term_sets = pd.DataFrame({"label": list(set_label.values()), "name": list(levels), "description": list(levels),
                              "order": range(len(levels)),
                              "parent_term_set_label": ["", set_label["class"], set_label["subclass"]]})
    membership_frame = pd.DataFrame(membership)
    colors = membership_frame.merge(pd.DataFrame(terms)[["label", "color_hex_triplet"]],
                                    left_on="cluster_annotation_term_label", right_on="label")
    return {
        "cluster": pd.DataFrame({"label": labels["cluster"], "cluster_alias": aliases,
                                 "number_of_cells": rng.integers(10, 5000, size=n)}),
        "cluster_annotation_term_set": term_sets,
        "cluster_annotation_term": pd.DataFrame(terms),
        "cluster_to_cluster_annotation_membership": membership_frame,
        "views/cluster_to_cluster_annotation_membership_color": colors.pivot(
            index="cluster_alias", columns="cluster_annotation_term_set_name",
            values="color_hex_triplet").add_suffix("_color").reset_index(),
    }


def write_other_datasets(bucket_dir: Path, spec: FixtureSpec, genes: Genes, taxonomy: Taxonomy) -> list[str]:
    """The non-consensus datasets of OTHER_DATASETS, tiny; returns the keys written."""
    rng = _rng(spec, "other")
    written: list[Path] = []

    def path(dataset: str, kind: str, name: str) -> Path:
        out = bucket_dir / kind / dataset / OTHER_DATASETS[dataset][kind] / name
        written.append(out)
        return out

    def csv(dataset: str, name: str, frame: pd.DataFrame, kind: str = "metadata") -> None:
        _write_csv(frame, path(dataset, kind, f"{name}.csv"))

    # WMB-10X: the AIBS cells' genes (those of the WMB-10Xv2/v3 matrices) and a small ROI table.
    csv(WMB_10X, "gene", wmb_gene_table(genes))
    csv(WMB_10X, "region_of_interest_metadata", pd.DataFrame({
        "acronym": sorted(set(ROI_OF_REGION.values())), "order": range(1, len(set(ROI_OF_REGION.values())) + 1)}))
    # WMB-taxonomy: tables (+ a view) whose aliases overlap the consensus ones, and MapMyCells files.
    tables = _other_taxonomy(spec, taxonomy)
    for stem, table in tables.items():
        csv(WMB_TAXONOMY, stem, table)
    # Two levels below the version directory: counted in total_size, not listed.
    csv(WMB_TAXONOMY, "views/20230830/cluster_annotation_term", tables["cluster_annotation_term"].head(3))
    markers = {label: list(genes.symbols[:5]) for label in tables["cluster"]["label"][:3]}
    _write_bytes(json.dumps(markers, indent=1).encode(), path(WMB_TAXONOMY, "mapmycells", "mouse_markers_230821.json"))
    _write_h5(path(WMB_TAXONOMY, "mapmycells", "precomputed_stats_ABC_revision_230821.h5"),
              {"n_cells": rng.integers(10, 1000, size=8), "sum": rng.random((8, 5)).astype(np.float32)})
    # MERFISH: cells mapped to WMB-taxonomy clusters, its gene panel, a view and tiny matrices.
    n_cells, panel = 16, min(10, spec.genes)
    merfish_genes = pd.DataFrame({"gene_identifier": genes.identifiers[:panel], "gene_symbol": genes.symbols[:panel],
                                  "transcript_identifier": [f"ENSMUST{i:011d}" for i in range(panel)]})
    cell_labels = [f"{1019171907102340000 + 37 * i}-1" for i in range(n_cells)]
    cells = pd.DataFrame({"cell_label": cell_labels, "brain_section_label": "C57BL6J-638850.01",
                          "cluster_alias": rng.choice(tables["cluster"]["cluster_alias"], size=n_cells),
                          "average_correlation_score": np.round(rng.random(n_cells), 6),
                          "feature_matrix_label": "C57BL6J-638850", "donor_label": "C57BL6J-638850",
                          "donor_genotype": "wt/wt", "donor_sex": "M",
                          "x": np.round(rng.random(n_cells) * 10, 6), "y": np.round(rng.random(n_cells) * 10, 6),
                          "z": 5.0})
    csv(MERFISH, "cell_metadata", cells)
    csv(MERFISH, "gene", merfish_genes)
    csv(MERFISH, "views/cell_metadata_with_cluster_annotation",
        cells.merge(tables["cluster"][["label", "cluster_alias"]], on="cluster_alias").rename(
            columns={"label": "cluster"}))
    counts = sp.csr_matrix(rng.poisson(2.0, size=(n_cells, panel)).astype(np.float32))
    obs = pd.DataFrame(index=pd.Index(cell_labels, name="cell_label"))
    var = pd.DataFrame({"gene_symbol": merfish_genes["gene_symbol"].to_numpy()},
                       index=pd.Index(merfish_genes["gene_identifier"].to_numpy(), name="gene_identifier"))
    for norm, matrix in (("raw", counts), ("log2", log2_cpm(counts))):
        out = path(MERFISH, "expression_matrices", f"C57BL6J-638850-{norm}.h5ad")
        out.parent.mkdir(parents=True, exist_ok=True)
        ad.AnnData(X=matrix, obs=obs, var=var).write_h5ad(out)
    # Allen-CCF-2020 image volumes (.nii.gz, keyed by the stem before .nii.gz).
    for stem in ("annotation_25", "average_template_25"):
        _write_bytes(_nifti_gz(rng, (6, 5, 4)), path(ALLEN_CCF, "image_volumes", f"{stem}.nii.gz"))
    # mmc-gene-mapper: one SQLite database.
    _write_sqlite(path(MMC_GENE_MAPPER, "mapmycells", "mmc_gene_mapper.2025-08-04.db"), genes)
    # HMBA-10xMultiome-BG: metadata, and image volumes that lie too deep for the listing ({} in file_listing).
    csv(HMBA_BG, "donor", pd.DataFrame({"donor_label": ["H20.30.001", "QM23.50.001", "CJ23.56.004"],
                                        "species_genus": ["Homo", "Macaca", "Callithrix"]}))
    csv(HMBA_BG, "human_gene", pd.DataFrame({"gene_identifier": ["ENSG00000132639", "ENSG00000104888"],
                                             "gene_symbol": ["SNAP25", "SLC17A7"]}))
    for name, data in (("zarr.json", b'{"zarr_format": 3, "node_type": "group"}'), ("0/c/0/0/0", bytes(64))):
        _write_bytes(data, path(HMBA_BG, "image_volumes", f"ome_zarr/HMBA-BG.zarr/{name}"))
    # HMBA-MERSCOPE: section outlines under geojsons/.
    for plane in ("BS.3.Plane.01", "CX.13.Plane.01"):
        polygon = np.round(rng.random((4, 2)) * 1000, 2).tolist()
        feature = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"name": plane},
                   "geometry": {"type": "Polygon", "coordinates": [[*polygon, polygon[0]]]}}]}
        _write_bytes(json.dumps(feature).encode(),
                     path(HMBA_MERSCOPE, "image_volumes", f"geojsons/H22.30.001.{plane}.geojson"))
    # WHB-10Xv3 (human): donors and a few genes.
    csv(WHB, "donor", pd.DataFrame({"donor_label": ["H18.30.001", "H18.30.002", "H19.30.001"],
                                    "donor_sex": ["Male", "Male", "Male"]}))
    csv(WHB, "gene", pd.DataFrame({"gene_identifier": ["ENSG00000132639", "ENSG00000104888", "ENSG00000128683"],
                                   "gene_symbol": ["SNAP25", "SLC17A7", "GAD1"]}))
    # The dataset UNCHANGED_RELEASE adds.
    dev_cells = pd.DataFrame({"cell_label": [f"AAACCCAAGT{i:06d}-1" for i in range(6)],
                              "library_label": "L8TX_230101_01_A01", "donor_label": "P14-1"})
    csv(NEW_DATASET, "cell_metadata", dev_cells)
    csv(NEW_DATASET, "donor", pd.DataFrame({"donor_label": ["P14-1"], "donor_age": ["P14"]}))
    csv(NEW_DATASET, "gene", merfish_genes[["gene_identifier", "gene_symbol"]])
    csv(NEW_DATASET, "views/example_gene_expression",
        dev_cells[["cell_label"]].assign(Snap25=np.round(rng.random(6) * 8, 4)))
    return sorted(p.relative_to(bucket_dir).as_posix() for p in written)


def make_bucket(root: Path, spec: FixtureSpec = FixtureSpec()) -> GeneratedBucket:
    """Write the generated bucket under ``root/allen-brain-cell-atlas`` and its four release manifests.

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

    for cells, version in () if spec.metadata_only else ((macosko, OLD_RELEASE), (wmb, WMB_MATRIX_VERSION)):
        for label, matrix_dataset in sorted(cells.matrix_dataset.items()):
            out_dir = bucket_dir / "expression_matrices" / matrix_dataset / version
            write_matrices(spec, out_dir, cells, genes, taxonomy, label)
    # The rest of the atlas (WMB-10X's gene.csv among it), dated from 2023 to UNCHANGED_RELEASE.
    write_other_datasets(bucket_dir, spec, genes, taxonomy)

    # The consensus data, first listed by OLD_RELEASE. The MD5 of the large tables is taken while they
    # are written, for the manifests.
    hashes: FileHashes = {}
    write_metadata_dir(bucket_dir / "metadata" / MACOSKO / OLD_RELEASE, macosko, genes, hashes)
    write_metadata_dir(bucket_dir / "metadata" / CONSENSUS_WMB / OLD_RELEASE, wmb, None, hashes)
    write_taxonomy_dir(bucket_dir / "metadata" / TAXONOMY / OLD_RELEASE, taxonomy, [macosko, wmb], hashes)

    # NEW_RELEASE: the AIBS cells' list changes (cell_metadata.csv) and so does the taxonomy's
    # cell_to_cluster_membership (re-assigned, dropped, added cells), cluster counts and embeddings;
    # donor, library, value_sets and the taxonomy's term tables are the same files in new directories.
    wmb_new, changes = evolve_cells(spec, wmb, n_clusters)
    write_metadata_dir(bucket_dir / "metadata" / CONSENSUS_WMB / NEW_RELEASE, wmb_new, None, hashes)
    write_taxonomy_dir(bucket_dir / "metadata" / TAXONOMY / NEW_RELEASE, taxonomy, [macosko, wmb_new], hashes)

    # Each release pins the newest directory not newer than itself: PRE_CONSENSUS_RELEASE lists no
    # consensus directory, UNCHANGED_RELEASE the consensus ones of OLD_RELEASE plus NEW_DATASET.
    for release in RELEASES:
        write_manifest(bucket_dir, release, hashes)

    generated = GeneratedBucket(root, spec, list(RELEASES), changes={CONSENSUS_WMB: changes})
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
