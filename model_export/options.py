"""``alexnet-train``'s command line, generated from ``alexnet_core.training.TrainRun``'s fields.

Not pydantic-settings' CLI source: two API names differ from the options users know
(``target_top1`` is ``--stop-at-top1``, ``flip`` is ``--no-flip``), and its aliases would rename the
JSON fields of ``POST /train`` too; it would also read ``ALEXNET_*`` variables into the recipe.
Options carry no argparse defaults: what is not given is left to the model, which holds the one
default of each parameter, so ``--help`` shows the model's defaults and ``--config`` values are
overridden only by options really given.
"""

import argparse
import json
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from alexnet_core.training import Cli, TrainRun


def _cli(field: FieldInfo) -> Cli:
    return next((m for m in field.metadata if isinstance(m, Cli)), Cli())


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    default = field.default
    if field.is_required() or field.default_factory is not None or default is None:
        return text
    if isinstance(default, bool):
        return f"{text} (default {'on' if default else 'off'})"
    return f"{text} (default {default})"


def _add(group: argparse._ActionsContainer, name: str, field: FieldInfo) -> None:
    cli = _cli(field)
    kind = _base_type(field.annotation)
    common: dict[str, Any] = {"help": _help(field), "default": argparse.SUPPRESS}
    if cli.positional:  # optional here, as --config may give it; None when left out (not SUPPRESS,
        # which argparse would pass through ``type`` for a positional)
        group.add_argument(name, type=kind, nargs="?", help=common["help"], default=None)
        return
    flag = cli.flag or "--" + name.replace("_", "-")
    if kind is bool:
        group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, **common)
        return
    if get_origin(kind) is Literal:
        common["choices"] = get_args(kind)
        kind = str
    group.add_argument(flag, dest=name, type=kind, metavar=cli.metavar, **common)


def parser(model: type[BaseModel] = TrainRun, **kwargs: Any) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, **kwargs)
    groups = {
        "recipe": p.add_argument_group("recipe (defaults: the paper's, except --init and --input-scaling)"),
        "running": p.add_argument_group("running"),
    }
    p.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="read the parameters from this JSON file (a job's config.json); options given override it",
    )
    for name, field in model.model_fields.items():
        cli = _cli(field)
        _add(p if cli.positional else groups[cli.group], name, field)
    return p


def parse(argv: list[str] | None, p: argparse.ArgumentParser, model: type[TrainRun] = TrainRun) -> TrainRun:
    """The command line (over ``--config``'s file) as a validated model; exits 2 with argparse's
    usage line on a bad value, as for any argparse error."""
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    values: dict[str, Any] = {}
    if (config := given.pop("config", None)) is not None:
        try:
            values = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            p.error(f"--config {config}: {exc}")
        if not isinstance(values, dict):
            p.error(f"--config {config}: expected a JSON object")
    try:
        return model.model_validate(values | given)
    except ValidationError as exc:
        problems = "; ".join(f"{_option(model, e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))
        p.error(problems)
    raise AssertionError("unreachable: p.error exits")  # pragma: no cover


def _option(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    name = str(loc[0]) if loc else "arguments"
    field = model.model_fields.get(name)
    if field is None:
        return name
    cli = _cli(field)
    return name if cli.positional else cli.flag or "--" + name.replace("_", "-")
