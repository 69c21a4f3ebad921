"""Settings every stage reads from the environment (prefix ``ALEXNET_``): the server, the export and
training CLIs agree on where models and datasets live. ``service.core.config.Settings`` extends it."""

import argparse
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALEXNET_", env_file=".env", extra="ignore")

    weights_dir: Path = Field(Path("weights"), description="models (*.onnx), downloads, training runs")
    data_root: Path = Field(Path("data"), description="root that /train dataset paths are relative to")


def add_weights_dir(parser: argparse.ArgumentParser, what: str) -> None:
    """The CLIs' ``--weights-dir`` option, ``what`` its help: by default where the server looks."""
    parser.add_argument(
        "--weights-dir",
        type=Path,
        default=CommonSettings().weights_dir,
        help=f"{what} (default: ALEXNET_WEIGHTS_DIR, else weights)",
    )
