"""`make test` and `make demo` provide their own servers and leave the machine's alone."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import REPO, SERVER_URL

SCRIPTS = ("ensure-postgres.sh", "ensure-redis.sh", "stop-services.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_leave_the_machines_configuration_alone(script):
    text = (REPO / "scripts" / script).read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "/etc/" not in code and "pg_hba" not in code and "sed -i" not in code
    assert "pg_ctlcluster" not in code and "systemctl" not in code


def test_make_passes_the_servers_it_provides():
    makefile = (REPO / "Makefile").read_text()
    test = makefile[makefile.index("\ntest:"):makefile.index("\nlint:")]
    assert "scripts/ensure-postgres.sh" in test and "scripts/ensure-redis.sh" in test
    assert 'ABC_TEST_SERVER_URL="$$url"' in test and 'ABC_TEST_BROKER_URL="$$broker"' in test
    demo = makefile[makefile.index("\ndemo:"):makefile.index("\ntest:")]
    assert "scripts/ensure-postgres.sh abc_demo" in demo and 'ABC_DEMO_DATABASE_URL="$$url"' in demo
    assert "apt-get" not in makefile and "ensure-compose" not in makefile


def test_the_throwaway_cluster_is_local_and_reused():
    """Runs only against the cluster scripts/ensure-postgres.sh made (`make test` without a given server)."""
    engine = sa.create_engine(SERVER_URL)
    try:
        with engine.connect() as conn:
            setting = {name: conn.exec_driver_sql(f"SHOW {name}").scalar()
                       for name in ("data_directory", "hba_file", "listen_addresses", "port")}
    except sa.exc.DBAPIError as error:  # a given server, e.g. without pg_read_all_settings
        pytest.skip(f"the tests run against a given server: {error.orig}")
    finally:
        engine.dispose()
    data = Path(setting["data_directory"])
    if (data.parent != REPO / "var" / "pg" and not data.parent.name.startswith("abc-mirror-pg-")) \
            or "abc-mirror throwaway cluster" not in (data / "postgresql.conf").read_text():
        pytest.skip(f"the tests run against a given server ({data}), not the throwaway cluster")
    assert not setting["hba_file"].startswith("/etc/")
    assert setting["listen_addresses"] == "127.0.0.1"

    # Running the script again reuses the cluster: same URL, nothing re-initialised.
    first = subprocess.run([str(REPO / "scripts" / "ensure-postgres.sh")], capture_output=True, text=True, check=True)
    again = subprocess.run([str(REPO / "scripts" / "ensure-postgres.sh"), "abc_demo"], capture_output=True,
                           text=True, check=True)
    assert first.stdout.strip() == f"postgresql+psycopg://postgres@127.0.0.1:{setting['port']}/postgres"
    assert again.stdout.strip().endswith(f":{setting['port']}/abc_demo")
    assert "initdb" not in first.stderr + again.stderr

    hba = [line.split() for line in (data / "pg_hba.conf").read_text().splitlines()
           if line.strip() and not line.lstrip().startswith("#")]
    assert all(row[0] == "local" or row[3] in ("127.0.0.1/32", "::1/128") for row in hba), hba
    assert re.search(r"^listen_addresses = '127\.0\.0\.1'$", (data / "postgresql.conf").read_text(), re.M)
