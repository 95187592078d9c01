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


@pytest.fixture(scope="session")
def generator_parts(tmp_path_factory, encoders, shapes):
    """(tiny tokenizer dir, tiny Shapes text model dir, Shapes dataset dir with edit pairs)."""
    from tests.generator_fixtures import write_tiny_text_model, write_tiny_tokenizer
    from unimm.cli import main

    root = tmp_path_factory.mktemp("generator-parts")
    tokenizer = write_tiny_tokenizer(encoders, shapes, root)
    text_model = write_tiny_text_model(root / "text-model")
    edits = root / "shapes-edit"
    assert main(["shapes", "dataset", "-o", str(edits), "resolution=32", "num_train=8", "num_val=4", "num_edit_train=16",
                 "num_edit_val=4", "write_parquet=false", "num_dpg_items=2", "samples_per_shard=8"]) == 0
    return tokenizer, text_model, edits
