"""What the subcommands share: flags generated from the config dataclasses, and the model and engine groups.

A config field becomes a flag by `add_config_args`: `--field-name`, its destination the field name, its
default the field's default, its help, choices, parser and metavar the field's `metadata`; a bool field is
a `--flag/--no-flag` pair. So a default or a choice is written once, in the config (engine/config.py,
server/config.py), and a new field is a new flag. A subcommand may override a default, but then its help
says why (`bench throughput --max-num-seqs`).

Nothing here imports torch: the configs load without it, and `linrec --help` must stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from linrec.engine.config import EngineConfig

# EngineConfig's fields that say what to load and how; `linrec info` takes only these, `serve` and
# `generate` take them and the rest of EngineConfig's fields (the engine group).
MODEL_FIELDS = ("model", "dtype", "device", "kernel_backend", "linearize", "merge_lora")
ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name not in MODEL_FIELDS)


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse type: its ValueError becomes a usage error that keeps its message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _value_type(config_cls: type, field: dataclasses.Field) -> type:
    """The field's type with None taken out of an optional one: bool, int, float or str."""
    hint = typing.get_type_hints(config_cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [t for t in typing.get_args(hint) if t is not type(None)]
        hint = options[0] if len(options) == 1 else hint
    if hint not in (bool, int, float, str):
        raise TypeError(f"expected a 'parse' function in the metadata of {config_cls.__name__}.{field.name}: {hint}")
    return hint


def add_config_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_cls: type,
    names: Sequence[str],
    *,
    defaults: dict[str, Any] | None = None,
    helps: dict[str, str] | None = None,
) -> None:
    """Add a flag for each field of the dataclass `config_cls` named in `names` (in that order).

    defaults / helps: per field, a default or help other than the config's (a bench that deliberately differs
    from the config says why in its help).
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    defaults, helps = defaults or {}, helps or {}
    for name in names:
        field = fields[name]
        meta = field.metadata
        default = defaults.get(name, field.default)
        help_text = helps.get(name, meta["help"]).replace("%", "%%")
        if default is not None:
            help_text += " (default: %(default)s)"
        kwargs: dict[str, Any] = {"dest": name, "default": default, "help": help_text}
        if "parse" in meta:
            kwargs["type"] = _argparse_type(meta["parse"])
        elif (value_type := _value_type(config_cls, field)) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = value_type
        for key in ("choices", "metavar", "nargs"):
            if key in meta:
                kwargs[key] = meta[key]
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def config_kwargs(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The parsed values of the flags `names` as config keyword arguments."""
    return {name: getattr(args, name) for name in names}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model group: EngineConfig's MODEL_FIELDS."""
    add_config_args(parser.add_argument_group("model"), EngineConfig, MODEL_FIELDS)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine group: every other EngineConfig field (scheduling, memory, prefix cache, seed, CUDA graphs)."""
    add_config_args(parser.add_argument_group("engine"), EngineConfig, ENGINE_FIELDS)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed model and engine flags."""
    return EngineConfig(**config_kwargs(args, MODEL_FIELDS + ENGINE_FIELDS))
