"""Command lines built from configuration dataclasses.

Each entry point keeps its whole configuration in one dataclass whose fields carry their help
text in `field(metadata={"help": ...})`; this module turns it into an argparse parser so the
defaults, the types and the help live in one place.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def _plain_type(annotation: Any) -> tuple[Any, bool]:
    """The scalar type of a field annotation and whether it is a list."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _plain_type(args[0])
    if origin in (list, tuple, Sequence) and args:
        return args[0], True
    return annotation, False


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or cls.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind, is_list = _plain_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if kind is bool and not is_list:
            # --flag / --no-flag, so a default of True can be switched off.
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
            continue
        convert = _bool if kind is bool else kind
        if is_list:
            parser.add_argument(flag, dest=f.name, type=convert, nargs="*", default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=convert, default=default, help=help_text)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Parse `argv` (default: sys.argv[1:]) into an instance of the dataclass `cls`."""
    namespace = build_parser(cls).parse_args(argv)
    return cls(**vars(namespace))
