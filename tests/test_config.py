from dataclasses import dataclass, field

import pytest

from interpdiff.config import ConfigError, from_dict, load_config, parse_cli, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.99])


@dataclass
class Schema:
    name: str = "run"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\noptim:\n  lr: 0.5\n")
    cfg = parse_cli(Schema, ["--config", str(p), "steps=3", "optim.lr=0.25"])
    assert cfg == Schema(name="a", steps=3, optim=Optim(lr=0.25))


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown config key 'optim\.lrr'"):
        load_config(Schema, p)


def test_unknown_override_and_wrong_type_are_named():
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        load_config(Schema, overrides=["stepz=3"])
    with pytest.raises(ConfigError, match="bad value for config key 'steps'.*'many'"):
        load_config(Schema, overrides=["steps=many"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Schema, overrides=["steps"])
    with pytest.raises(ConfigError, match="unknown option"):
        parse_cli(Schema, ["--stepz", "3"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Schema, "/nonexistent/x.yaml")


def test_save_round_trip(tmp_path):
    cfg = load_config(Schema, overrides=["optim.lr=3e-3"])
    path = save_config(cfg, tmp_path / "run")
    assert load_config(Schema, path) == cfg
    assert from_dict(Schema, to_dict(cfg)) == cfg


def test_several_config_files_merge_in_order(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("name: a\nsteps: 4\n")
    b.write_text("steps: 7\noptim:\n  lr: 0.5\n")
    cfg = parse_cli(Schema, ["--config", str(a), "--config", str(b), "optim.lr=0.25"])
    assert cfg == Schema(name="a", steps=7, optim=Optim(lr=0.25))
    b.write_text("stepz: 1\n")
    with pytest.raises(ConfigError, match=r"b\.yaml.*unknown config key 'stepz'"):
        parse_cli(Schema, ["--config", str(a), "--config", str(b)])


def test_override_values_that_are_not_yaml_are_plain_strings_or_named_errors(tmp_path):
    """``data.shards=*.tar`` is a YAML alias error as YAML; as the string it was typed as it is what
    the user meant. A non-string key names the override; a list-shaped file names the file."""
    c = load_config(Schema, None, ["name=*.tar"])
    assert c.name == "*.tar"
    assert load_config(Schema, None, ["name=["]).name == "["
    with pytest.raises(ConfigError, match=r"override 'optim\.lr=:': bad value for config key 'optim\.lr'"):
        load_config(Schema, None, ["optim.lr=:"])
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml'.*top level must be a mapping"):
        load_config(Schema, p)
