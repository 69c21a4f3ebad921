"""Settings every stage reads from the environment (prefix ``ALEXNET_``): the server, the export and
training CLIs agree on where models and datasets live. ``service.core.config.Settings`` extends it."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALEXNET_", env_file=".env", extra="ignore")

    weights_dir: Path = Field(Path("weights"), description="models (*.onnx), downloads, training runs")
    data_root: Path = Field(Path("data"), description="root that /train dataset paths are relative to")
