"""Config parsing: precedence default < preset < flag; booleans; --help documents every field."""

import dataclasses

import pytest

from nanopatho.config import build_parser, field, parse_config


@dataclasses.dataclass
class Cfg:
    preset: str = field("toy", "size")
    lr: float = field(1e-3, "learning rate")
    steps: int = field(10, "steps")
    resume: bool = field(False, "resume")
    name: str = field("a", "a name")


PRESETS = {"toy": {}, "big": {"lr": 0.5, "steps": 99}}


def test_precedence_default_preset_flag():
    assert parse_config(Cfg, PRESETS, []).lr == 1e-3
    cfg = parse_config(Cfg, PRESETS, ["--preset", "big"])
    assert (cfg.lr, cfg.steps, cfg.preset) == (0.5, 99, "big")
    cfg = parse_config(Cfg, PRESETS, ["--preset", "big", "--steps", "3"])
    assert (cfg.lr, cfg.steps) == (0.5, 3)


def test_booleans_and_types():
    assert parse_config(Cfg, PRESETS, ["--resume"]).resume is True
    assert parse_config(Cfg, PRESETS, ["--resume", "false"]).resume is False
    assert isinstance(parse_config(Cfg, PRESETS, ["--steps", "7"]).steps, int)
    with pytest.raises(SystemExit):
        parse_config(Cfg, PRESETS, ["--resume", "maybe"])
    with pytest.raises(SystemExit):
        parse_config(Cfg, PRESETS, ["--preset", "nope"])


def test_help_lists_every_field():
    text = build_parser(Cfg, PRESETS).format_help()
    for f in dataclasses.fields(Cfg):
        assert f"--{f.name}" in text
    assert "learning rate" in text
