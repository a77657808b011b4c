"""Command lines from configuration dataclasses, and back.

Every entry point keeps its whole configuration in one dataclass whose fields carry their help
text in `field(metadata={"help": ...})`; this module turns it into an argparse parser (a field
without help is a bug, refused when the parser is built), a `Literal[...]` annotation into the
flag's choices, and a config back into the command line that reproduces it, so one stage runs
another in a fresh process from a config object, never from a hand-built list of strings.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import types
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def _plain_type(annotation: Any) -> tuple[Any, bool, tuple | None]:
    """(scalar type, is a list, Literal choices or None) of a field annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _plain_type(args[0])
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), False, choices
    if origin in (list, tuple, Sequence) and args:
        kind, _, choices = _plain_type(args[0])
        return kind, True, choices
    return annotation, False, None


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _optional(convert: Any) -> Any:
    """`none` on the command line is None for an `X | None` field."""
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING  # a required (positional) field


def build_parser(cls: type, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description or cls.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help")
        if not help_text:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: every flag documents itself")
        kind, is_list, choices = _plain_type(hints[f.name])
        nullable = type(None) in typing.get_args(hints[f.name])
        if kind is bool and not is_list:
            # --flag / --no-flag, so a default of True can be switched off.
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=_default(f), help=help_text)
            continue
        convert = _bool if kind is bool else kind
        convert = _optional(convert) if nullable else convert
        if f.metadata.get("positional"):  # e.g. `presample.py --merge OUT SHARD...`
            nargs = ("+" if f.default_factory is dataclasses.MISSING else "*") if is_list else None
            parser.add_argument(f.name, type=convert, nargs=nargs, choices=choices, help=help_text)
            continue
        parser.add_argument(_flag(f.name), dest=f.name, type=convert, nargs="*" if is_list else None,
                            choices=choices, default=_default(f), help=help_text)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Parse `argv` (default: sys.argv[1:]) into an instance of the dataclass `cls`."""
    namespace = build_parser(cls, prog=prog).parse_args(argv)
    return cls(**vars(namespace))


def to_argv(cfg: Any) -> list[str]:
    """The flags that `parse_config(type(cfg), ...)` turns back into `cfg` (only those off their default)."""
    argv: list[str] = []
    positional: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("positional"):
            positional += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
            continue
        if value == _default(f):
            continue
        if isinstance(value, bool):
            argv.append(_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [_flag(f.name), *map(str, value)]
        else:
            # --flag=value: a value that starts with "-" (a prompt, a negative number) stays a value
            argv.append(f"{_flag(f.name)}={'none' if value is None else value}")
    return positional + argv


def run_stage(module: str, cfg: Any, *, launcher: Sequence[str] = (), env: dict[str, str] | None = None,
              cwd: str | os.PathLike | None = None) -> str:
    """Run `python [launcher...] -m module` with `cfg` as its flags in a fresh process; returns the
    command (printed first, so a user can rerun a stage by hand). A fresh process because vLLM and
    torchrun each want one of their own. Raises CalledProcessError when the stage fails."""
    cmd = [sys.executable, *launcher, "-m", module, *to_argv(cfg)]  # torchrun takes -m as python does
    shown = shlex.join(cmd)
    print(f"\n$ {shown}", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=cwd)
    return shown
