"""The config system: defaults, YAML deltas with _base_, dotted overrides, typo errors, saved copy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from unimm.config import build_config, load_resolved_config, parse_override, save_resolved_config
from unimm.errors import ConfigError


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 5000


@dataclass
class TrainConfig:
    batch_size: int = 96
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: Literal["bf16", "fp32"] = "bf16"
    gradient_checkpointing: bool = False
    shards: list[str] = field(default_factory=list)
    resume_from: str | None = None


@dataclass
class RunConfig:
    name: str = "run"
    train: TrainConfig = field(default_factory=TrainConfig)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_deltas():
    config = build_config(RunConfig)
    assert config == RunConfig()


def test_yaml_delta_then_overrides_in_order(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  batch_size: 32\n  optim:\n    lr: 3.0e-4\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nname: child\ntrain:\n  optim:\n    warmup_steps: 10\n")
    config = build_config(RunConfig, [child], ["train.optim.lr=1e-4", "train.shards=[a.tar, b.tar]", "train.precision=fp32"])
    assert config.name == "child"
    assert config.train.batch_size == 32  # from the base file
    assert config.train.optim.warmup_steps == 10  # from the child file
    assert config.train.optim.lr == pytest.approx(1e-4)  # override wins; YAML reads "1e-4" as text, coerced
    assert config.train.optim.betas == (0.9, 0.95)  # untouched default
    assert config.train.shards == ["a.tar", "b.tar"]
    assert config.train.precision == "fp32"


def test_optional_and_tuple_values():
    config = build_config(RunConfig, [], ["train.resume_from=runs/x", "train.optim.betas=[0.8, 0.99]"])
    assert config.train.resume_from == "runs/x"
    assert config.train.optim.betas == (0.8, 0.99)
    assert build_config(RunConfig, [], ["train.resume_from=null"]).train.resume_from is None


@pytest.mark.parametrize(
    ("override", "expected_fragment"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("train.optim.lrr=1", "did you mean 'train.optim.lr'?"),
        ("trian.batch_size=2", "did you mean 'train'?"),
        ("train.bach_size=2", "did you mean 'train.batch_size'?"),
    ],
)
def test_unknown_key_names_key_and_closest(override, expected_fragment):
    with pytest.raises(ConfigError, match=expected_fragment.replace("?", r"\?").replace(".", r"\.")):
        build_config(RunConfig, [], [override])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  batchsize: 3\n")
    with pytest.raises(ConfigError) as error:
        build_config(RunConfig, [path])
    assert "train.batchsize" in str(error.value) and "bad.yaml" in str(error.value)
    assert "train.batch_size" in str(error.value)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.batch_size=abc", "expects an integer"),
        ("train.batch_size=1.5", "expects an integer"),
        ("train.gradient_checkpointing=maybe", "expects true or false"),
        ("train.precision=fp16", "must be one of"),
        ("train.optim.betas=[0.9]", "exactly 2 items"),
        ("train.optim=3", "expects a mapping"),
        ("nokeyvalue", "not of the form"),
    ],
)
def test_bad_values_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as error:
        build_config(RunConfig, [], [override])
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_file_and_base_loop(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(RunConfig, [tmp_path / "nope.yaml"])
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        build_config(RunConfig, [tmp_path / "a.yaml"])


def test_resolved_config_round_trip(tmp_path):
    config = build_config(RunConfig, [], ["train.optim.lr=2e-5", "train.shards=[x]"])
    path = save_resolved_config(config, tmp_path / "run")
    assert path.name == "config.yaml"
    text = path.read_text()
    assert "warmup_steps: 5000" in text  # every key is written, not only the deltas
    assert load_resolved_config(RunConfig, tmp_path / "run") == config


def test_parse_override_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=") == ("a", "")


def test_a_bare_yaml_no_on_the_command_line_means_the_word_no():
    # `train.mixed_precision=no` parses as YAML false; the choices are words, so it means "no".
    from unimm.train_config import GeneratorTrainingConfig

    assert build_config(GeneratorTrainingConfig, [], ["train.mixed_precision=no"]).train.mixed_precision == "no"
