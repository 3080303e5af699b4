"""Fixtures every test shares."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test servers listen on 127.0.0.1: a proxy from the environment would route their traffic
    elsewhere."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def ci_study(tmp_path_factory: pytest.TempPathFactory):
    """The ci study run once, end to end with local cores, for every test that reads it (they
    must not change it: copy what they need): its folder and Snakemake's result."""
    from .test_workflow import CI_CONFIG, snakemake

    workdir = tmp_path_factory.mktemp("ci-study")
    result = snakemake(
        "--cores", "2", "--configfile", str(CI_CONFIG), "--directory", str(workdir),
        timeout=900,
    )  # fmt: skip
    return workdir, result
