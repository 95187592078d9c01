"""Keep the suite off the user's home: caches (e.g. the shard-index cache) go to a temporary HOME."""

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
