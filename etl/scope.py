"""What a run takes from a release: a named scope over the manifest's files, and the history floor.

Every real manifest lists the whole atlas (43 datasets, 916 GB in 20260711), and ``releases/``
keeps every release since 2023. A scope says which of those files a scheduled run mirrors and
which of them feed the warehouse (loaded and aggregated):

- ``consensus-mouse`` (the default): the consensus datasets (matched by patterns, since their
  names changed once before release), the WMB-10Xv2/WMB-10Xv3 matrices their AIBS cells live in,
  and the AIBS genes (``metadata/WMB-10X/<v>/gene.csv``). Everything it mirrors it also loads.
- ``atlas``: every file the manifest lists is mirrored (the institutional mirror); only the
  consensus-mouse part is loaded and aggregated, the other datasets are "mirrored, not loaded".

The history floor is the first release a scheduled deployment processes: by default the first
release whose manifest holds a dataset the scope loads; older releases are recorded as
``skipped``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from etl.manifest import DATE_RE

CONSENSUS_MOUSE = "consensus-mouse"
ATLAS = "atlas"
SCOPES = (CONSENSUS_MOUSE, ATLAS)
# Draft pages named them Consensus-Mouse-*; the bucket has Consensus-WMB-* (docs/layout.md).
DEFAULT_DATASET_PATTERNS = ("Consensus-WMB-*", "Consensus-Mouse-*")
# Matrices that the consensus AIBS cells reference by feature_matrix_label.
MATRIX_DATASETS = ("WMB-10Xv2", "WMB-10Xv3")
# (dataset, kind, tag) of files a loaded dataset needs from elsewhere: the AIBS cells' genes.
COMPANION_FILES = (("WMB-10X", "metadata", "gene"),)
AUTO_FLOOR = "auto"


class ScopeError(ValueError):
    """A scope that cannot be used as asked; the message names the scope and the problem."""


class FileRow(Protocol):
    dataset: str
    kind: str
    tag: str


@dataclass(frozen=True)
class Scope:
    name: str
    dataset_patterns: tuple[str, ...] = DEFAULT_DATASET_PATTERNS

    @classmethod
    def named(cls, name: str, dataset_patterns: Iterable[str] = DEFAULT_DATASET_PATTERNS) -> Scope:
        if name not in SCOPES:
            raise ScopeError(f"unknown scope {name!r}: choose one of {', '.join(SCOPES)}")
        patterns = tuple(p.strip() for p in dataset_patterns if p.strip())
        if not patterns:
            raise ScopeError(f"scope {name}: no dataset pattern given")
        return cls(name, patterns)

    def has_loader(self, dataset: str) -> bool:
        """Whether the warehouse loads this dataset's metadata (a consensus dataset)."""
        return any(fnmatch.fnmatchcase(dataset, p) for p in self.dataset_patterns)

    def feeds_warehouse(self, f: FileRow) -> bool:
        """Files loaded or aggregated: the consensus datasets, their matrices and their genes."""
        return (self.has_loader(f.dataset)
                or (f.kind == "expression_matrices" and f.dataset in MATRIX_DATASETS)
                or (f.dataset, f.kind, f.tag) in COMPANION_FILES)

    def mirrors(self, f: FileRow) -> bool:
        return self.name == ATLAS or self.feeds_warehouse(f)

    def mirrored(self, files: Iterable[FileRow]) -> list:
        return [f for f in files if self.mirrors(f)]

    def warehouse_files(self, files: Iterable[FileRow]) -> list:
        return [f for f in files if self.feeds_warehouse(f)]

    def holds_data(self, datasets: Iterable[str]) -> bool:
        """Whether a release listing these datasets has anything this scope loads."""
        return any(self.has_loader(d) for d in datasets)

    def require_loaders(self, datasets: Iterable[str] | None) -> None:
        """Refuse, naming them, datasets asked for loading that no loader handles."""
        without = sorted(d for d in datasets or [] if not self.has_loader(d))
        if without:
            raise ScopeError(f"no loader for dataset(s) {', '.join(without)}: the warehouse loads datasets matching "
                             f"{', '.join(self.dataset_patterns)} (ABC_SCOPE_DATASETS); other datasets are mirrored, "
                             "not loaded")


def history_floor(datasets_by_release: dict[str, set[str]], scope: Scope, configured: str = AUTO_FLOOR) -> str | None:
    """The first release a scheduled run processes: ``configured`` (YYYYMMDD), or with ``auto`` the
    first release whose manifest holds a dataset the scope loads (None when no release does)."""
    if configured != AUTO_FLOOR:
        if not DATE_RE.match(configured):
            raise ScopeError(f"first release {configured!r} is neither YYYYMMDD nor {AUTO_FLOOR!r} (ABC_FIRST_RELEASE)")
        return configured
    return next((r for r in sorted(datasets_by_release) if scope.holds_data(datasets_by_release[r])), None)
