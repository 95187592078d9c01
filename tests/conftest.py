"""Keep the suite off the user's home: caches (e.g. the shard-index cache) go to a temporary HOME."""

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="session")
def encoders(tmp_path_factory):
    """Tiny saved representation encoders of every family ({kind: directory})."""
    from tests.tokenizer_fixtures import write_tiny_encoders

    return write_tiny_encoders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A tiny 32 px Shapes dataset (48 training, 8 validation images)."""
    from tests.tokenizer_fixtures import write_tiny_shapes

    return write_tiny_shapes(tmp_path_factory.mktemp("shapes"))
