"""pruner/cli.py: a config dataclass <-> its command line, both ways."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from pruner.cli import build_parser, parse_config, to_argv
from pruner.configs import DatasetConfig, PresampleConfig, TrainConfig


@dataclass
class _Merge:
    """A config with positionals, a Literal, an optional int and a bool."""

    out: str = field(metadata={"help": "merged file", "positional": True})
    shards: list[str] = field(metadata={"help": "shard files", "positional": True})
    overwrite: bool = field(default=False, metadata={"help": "replace"})
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "how"})
    limit: int | None = field(default=3, metadata={"help": "how many"})


def test_positionals_literals_none_and_bools_round_trip():
    cfg = parse_config(_Merge, ["o.jsonl", "a.jsonl", "b.jsonl", "--overwrite", "--mode", "slow", "--limit", "none"])
    assert cfg == _Merge("o.jsonl", ["a.jsonl", "b.jsonl"], overwrite=True, mode="slow", limit=None)
    assert parse_config(_Merge, to_argv(cfg)) == cfg


def test_a_literal_refuses_other_values(capsys):
    with pytest.raises(SystemExit):
        parse_config(_Merge, ["o", "a", "--mode", "medium"])
    assert "invalid choice: 'medium'" in capsys.readouterr().err


@pytest.mark.parametrize("cls", [PresampleConfig, DatasetConfig, TrainConfig])
def test_every_stage_config_round_trips_through_its_command_line(cls):
    changed = {}
    for f in dataclasses.fields(cls):  # move every field off its default
        value = getattr(cls(), f.name)
        if isinstance(value, bool):
            changed[f.name] = not value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            changed[f.name] = value + 1
        elif f.name in ("loss", "ratio_level", "think", "kind", "device"):
            continue
        elif isinstance(value, str) or value is None and "str" in str(f.type):
            changed[f.name] = "-starts with a dash"  # a value that looks like a flag stays a value
    cfg = dataclasses.replace(cls(), **changed)
    assert parse_config(cls, to_argv(cfg)) == cfg
    assert to_argv(cls()) == []


def test_a_field_without_help_is_refused_when_the_parser_is_built():
    @dataclass
    class Undocumented:
        size: int = 1

    with pytest.raises(TypeError, match="Undocumented.size has no help"):
        build_parser(Undocumented)
