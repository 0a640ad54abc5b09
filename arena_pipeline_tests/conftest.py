"""Shared fixtures: every test gets its own state folder, so nothing touches the developer's instance."""

import os

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("ARENA_STORAGE_HOME", raising=False)
    monkeypatch.delenv("ARENA_MLFLOW_URI", raising=False)
    yield home
