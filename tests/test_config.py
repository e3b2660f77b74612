"""Configuration: dataclass defaults, YAML overrides, clear errors, and no code execution from a config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ray_dal.config import ConfigError, ExperimentConfig, load_config, save_config

from .conftest import REPO


def test_the_shipped_yaml_holds_the_papers_protocol():
    cfg = load_config(REPO / "configs" / "cifar10.yaml")
    assert (cfg.loop.initial, cfg.loop.budget, cfg.model.name, cfg.scoring.gamma) == (500, 250, "cnn", 2.0)


def test_overrides_beat_the_file_which_beats_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loop:\n  budget: 1000\n  rounds: 3\nscoring:\n  gamma: .inf\n")
    cfg = load_config(path, {"loop.rounds": 7})
    assert (cfg.loop.budget, cfg.loop.rounds, cfg.loop.initial) == (1000, 7, ExperimentConfig().loop.initial)
    assert math.isinf(cfg.scoring.gamma)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("trian:\n  lr: 0.1\n", r"unknown key\(s\) \['trian'\] in the config's sections"),
        ("train:\n  epochs: 3\n", r"unknown key\(s\) \['epochs'\] in section 'train'; valid keys: \[.*'max_epochs'"),
        ("train: 3\n", "section 'train' must be a mapping"),
        ("scoring:\n  strategy: badg\n", r"scoring.strategy = 'badg' is invalid: choose one of"),
        ("scoring:\n  gamma: -1\n", "scoring.gamma = -1 is invalid"),
        ("loop:\n  budget: 0\n", "loop.budget = 0 is invalid"),
        ("train:\n  train_accuracy: 1.5\n", "train.train_accuracy = 1.5 is invalid"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("train:\n  num_workers: two\n", r"train.num_workers = 'two' is invalid: give an int >= 0 .* or 'auto'"),
        ("train:\n  num_workers: -1\n", "train.num_workers = -1 is invalid"),
        ("scoring:\n  scorer_lifetime: round\n", r"scoring.scorer_lifetime = 'round' is invalid: .* \['run', 'pass'\]"),
        ("scoring:\n  decode: gpu\n", r"scoring.decode = 'gpu' is invalid: choose one of \['auto', 'actors', 'tasks'"),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_missing_file_and_a_malformed_override_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must look like 'section.key'"):
        load_config(None, {"budget": 3})


def test_a_config_cannot_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f'loop: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match=r"evil.yaml' is not plain YAML data.*python/object"):
        load_config(path)
    assert not Path(marker).exists()


def test_the_num_workers_flag_takes_a_count_or_auto(capsys):
    from ray_dal.job import FLAGS, build_parser, config_overrides

    parser = build_parser(REPO / "configs" / "cifar10.yaml")
    for given, want in (("auto", "auto"), ("3", 3), ("0", 0)):
        args = vars(parser.parse_args(["--num-workers", given]))
        assert load_config(args["config"], config_overrides(args, FLAGS)).train.num_workers == want
    with pytest.raises(SystemExit):
        parser.parse_args(["--num-workers", "two"])
    assert "give a number of workers or 'auto', not 'two'" in capsys.readouterr().err
