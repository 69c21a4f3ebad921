"""MkDocs hook: the configuration page's tables, generated at build time from the settings models
(``service.core.config.Settings``, ``alexnet_core.training.TrainRun`` and ``service.schemas.TrainRequest``)
so that the page cannot drift from the code. Each marker ``<!-- settings:NAME -->`` in a page is
replaced by its table."""

import html
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[2]
# This checkout's code, not an installed copy of the package elsewhere.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from alexnet_core.training import Cli, TrainRun  # noqa: E402
from service.core.config import Settings  # noqa: E402
from service.schemas import TrainRequest  # noqa: E402

BOUNDS = (
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "≤"),
    (annotated_types.Lt, "lt", "<"),
)


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def type_name(annotation: Any) -> str:
    kind = _without_none(annotation)
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in get_args(kind))
    if get_origin(kind) is list:
        return "comma-separated list"
    names = {bool: "boolean", int: "integer", float: "number", str: "text", Path: "path", SecretStr: "secret"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def bounds(field: FieldInfo) -> str:
    found = []
    for meta in field.metadata:
        for kind, attribute, sign in BOUNDS:
            if isinstance(meta, kind):
                found.append(f"{sign} {getattr(meta, attribute)}")
        if isinstance(meta, annotated_types.MaxLen):
            found.append(f"at most {meta.max_length} characters")
    return ", ".join(found)


def default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return f"`{field.default_factory()}`"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, list):
        return f"`{','.join(value)}`" if value else "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    """A description as one table cell: no markup read into it (``*.onnx``, ``<out>``)."""
    escaped = html.escape(text, quote=False).replace("*", "\\*").replace("_", "\\_")
    return escaped.replace("|", "\\|").replace("\n", " ")


def serve_option(name: str, field: FieldInfo) -> str:
    """``alexnet-serve``'s option for a setting, as pydantic-settings' CLI makes it (kebab case,
    implicit flags for booleans)."""
    option = "--" + name.replace("_", "-")
    flag = _without_none(field.annotation) is bool
    return f"`{option}` / `--no-{name.replace('_', '-')}`" if flag else f"`{option}`"


def settings_table() -> str:
    rows = [
        "| variable | `alexnet-serve` option | type | default | what it does |",
        "|---|---|---|---|---|",
    ]
    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        kind = ", ".join(filter(None, (type_name(field.annotation), bounds(field))))
        rows.append(
            f"| `{prefix}{name.upper()}` | {serve_option(name, field)} | {kind} "
            f"| {default(field)} | {_cell(field.description or '')} |"
        )
    return "\n".join(rows)


def train_option(name: str, field: FieldInfo) -> str:
    """``alexnet-train``'s option for a field, as ``model_export/options.py`` makes it."""
    cli = next((m for m in field.metadata if isinstance(m, Cli)), Cli())
    if cli.positional:
        return f"`{name.upper()}` (positional)"
    flag = cli.flag or "--" + name.replace("_", "-")
    return f"`{flag}` / `--no-{flag[2:]}`" if _without_none(field.annotation) is bool else f"`{flag}`"


def training_table() -> str:
    rows = [
        "| `alexnet-train` option | `POST /train` field | type | default (command line / API) "
        "| bounds (command line / API) | what it does |",
        "|---|---|---|---|---|---|",
    ]
    cli_fields, api_fields = TrainRun.model_fields, TrainRequest.model_fields
    for name in [*cli_fields, *(n for n in api_fields if n not in cli_fields)]:
        cli, api = cli_fields.get(name), api_fields.get(name)
        field = cli or api
        assert field is not None
        defaults = [default(f) for f in (cli, api) if f is not None]
        limits = [bounds(f) or "none" for f in (cli, api) if f is not None]
        rows.append(
            f"| {train_option(name, cli) if cli else '–'} | {f'`{name}`' if api else '–'} "
            f"| {type_name(field.annotation)} | {' / '.join(dict.fromkeys(defaults))} "
            f"| {' / '.join(dict.fromkeys(limits))} | {_cell(field.description or '')} |"
        )
    return "\n".join(rows)


TABLES = {"serve": settings_table, "train": training_table}


def on_page_markdown(markdown: str, **_: Any) -> str:
    for name, table in TABLES.items():
        marker = f"<!-- settings:{name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, table())
    return markdown
