"""Fixtures for tests against a real local Slurm cluster (see cluster.py).

Every test in this directory is marked ``slurm``. The tests are skipped only when they cannot
run here (not root, or the Slurm/munge/MariaDB binaries are missing: run
``scripts/install-slurm.sh``); a cluster that is installed but does not come up is an error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from .cluster import LocalSlurm, missing_binaries

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slurm)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return (
            "the local Slurm cluster needs root (daemons run as root, munged via runuser); "
            "run the slurm tests as root after scripts/install-slurm.sh"
        )
    missing = missing_binaries()
    if missing:
        return (
            f"Slurm test cluster binaries missing ({', '.join(missing)}); "
            "run scripts/install-slurm.sh (as root) to install slurm-wlm, slurmdbd, munge, "
            "mariadb-server"
        )
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node Slurm cluster (LocalSlurm), shared by the whole session."""
    reason = _skip_reason()
    if reason:
        print(f"\nSKIP slurm tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    print(
        f"\nlocal Slurm up in {cluster.startup_seconds:.1f} s ({cluster.workdir})", file=sys.stderr
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def snakemake_cmd() -> list[str]:
    """The snakemake of the interpreter running the tests (its bin dir), not a fixed path."""
    exe = Path(sys.executable).parent / "snakemake"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "snakemake"]
