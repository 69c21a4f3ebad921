"""Settings from the environment (prefix ``ALEXNET_``); docs/configuration.md lists every one, generated
from this module when the docs site is built."""

from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import CliApp, NoDecode, SettingsConfigDict

from alexnet_core.resources import memory_limit, usable_cpus
from alexnet_core.settings import CommonSettings


def _split(value: object) -> object:
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


CommaList = Annotated[list[str], NoDecode]
# 0 means "derived from this machine" so that a deployment file can pass the default through.
AUTO_CPUS = " (CPU affinity and cgroup quota)"
AUTO_MEMORY = " of the memory limit (cgroup memory.max, else physical RAM)"


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


class Settings(CommonSettings):
    """alexnet-serve: every setting is an ALEXNET_<NAME> variable and a --<name> option."""

    # The command line is read only by ``from_command_line``: ``Settings()`` in a test or a
    # ``uvicorn service.main:app`` process never looks at sys.argv.
    model_config = SettingsConfigDict(
        cli_prog_name="alexnet-serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_avoid_json=True,
        cli_exit_on_error=True,
    )

    # Model (weights_dir and data_root: CommonSettings, shared with the export and training CLIs)
    model: str | None = Field(
        None,
        description="version (file stem) or file name in weights_dir to serve; default: the "
        "activated one, else the newest *.onnx",
    )
    providers: CommaList = Field(
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime execution providers in order of preference (comma-separated)",
    )
    prefer_fp16: bool = Field(
        True,
        description="with no model chosen (model, ACTIVE file) and the session on CUDA: serve the "
        "default model's fp16 variant if its agreement check recorded at export passed",
    )
    state_dir: Path | None = Field(
        None,
        description="where the server writes its state: training job records and runs, galleries, the "
        "ACTIVE file; default: weights_dir (a read-only weights_dir without it: those are disabled)",
    )
    database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL database for job records, the activation history and the galleries, "
        "shared by every server given it (postgresql+psycopg://user:password@host:5432/db; needs the "
        "postgres extra); unset = SQLite files in the state directory",
    )
    database_poll_s: float = Field(
        0.5,
        gt=0,
        description="with database_url: how often a server reads the activation history to follow "
        "an activation made through another",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads per call; 0 = one per core this process may use" + AUTO_CPUS,
    )

    # Input limits
    max_upload_mb: float = Field(20.0, gt=0, description="largest request body, checked while reading")
    max_pixels: int = Field(64_000_000, gt=0, description="largest image (width x height) decoded")
    max_files: int = Field(16, ge=1, description="most images in one /predict request")

    # Processes, concurrency, batching, backpressure
    workers: int | None = Field(
        None,
        ge=0,
        description="HTTP front processes on the one port, feeding one engine process that holds the "
        "model; unset = one per core" + AUTO_CPUS + "; 0 = the whole service in one process",
    )
    preprocess_threads: int = Field(
        0,
        ge=0,
        description="threads that cut a crops-kind model's crops and parse Open Inference Protocol "
        "bodies (off the event loop); 0 = one per core" + AUTO_CPUS,
    )
    decode_device: Annotated[Literal["auto", "cpu", "cuda"], BeforeValidator(_lower)] = Field(
        "auto",
        description="where baseline JPEGs are decoded: cuda = in batches on the GPU (nvImageCodec, the "
        "[gpu] extra; the server refuses to start without it), cpu = the decode workers, auto = cuda "
        "where possible; other images always take the decode workers (docs/gpu.md)",
    )
    decode_workers: int = Field(
        0, ge=0, description="processes that decode images; 0 = two per core" + AUTO_CPUS
    )
    decode_timeout_s: float = Field(
        5.0, gt=0, description="most CPU time one image's decode may use; then its worker is killed (413)"
    )
    decode_memory_mb: float = Field(
        0,
        ge=0,
        description="server-wide memory for decodes in progress, each image weighed from its header; "
        "0 = a quarter" + AUTO_MEMORY,
    )
    upload_memory_mb: float = Field(
        0,
        ge=0,
        description="server-wide memory for request bodies in progress (503 + Retry-After beyond); "
        "0 = an eighth" + AUTO_MEMORY,
    )
    max_jpeg_scans: int = Field(
        64, ge=1, description="most scans in a JPEG (each progressive scan re-reads the whole image)"
    )
    batching: bool = Field(True, description="gather concurrent requests into one inference call")
    max_batch_images: int = Field(
        8, ge=1, description="most images (x10 crops) in one inference call on the CPU provider"
    )
    device_batch_images: int = Field(
        128,
        ge=1,
        description="most images in one inference call where the session runs on CUDA (unless "
        "max_batch_images is set), and in one GPU decode (ALEXNET_DECODE_DEVICE)",
    )
    max_batch_delay_ms: float = Field(
        10.0, ge=0, description="longest wait for more images to batch, while admitted ones still decode"
    )
    max_queue_images: int = Field(
        64,
        ge=1,
        description="images admitted (decoding, queued or running) before 503 + Retry-After",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="longest a request waits for its result")

    # Training and model management
    api_key: SecretStr | None = Field(
        None,
        description="bearer key for /train and /model/activate; unset = those answer 403 (set it in "
        "the environment: a command line is visible to every user of the machine)",
    )

    train_on_ray: str | None = Field(
        None,
        description="Ray cluster (host:port of its head) that runs every training job as Ray Train "
        "workers (TrainRequest ray_workers, default 1); this server only submits and follows them. "
        "Needs the cluster extra and the data root, state dir and weights dir shared at the same "
        "path on every node; unset = jobs train on this host, one process each",
    )

    # Feature search (/embed, /gallery, /similar)
    gallery_max_items: int = Field(
        10_000, ge=1, description="most images in one model's gallery (16 KiB of vector each in memory)"
    )

    # HTTP
    host: str = Field("127.0.0.1", description="alexnet-serve bind address")
    port: int = Field(8000, description="alexnet-serve port")
    cors_origins: CommaList = Field([], description="origins allowed by CORS; empty = CORS off")
    # Connection hygiene (findings: idle or slow connections held for minutes exhausted the
    # descriptors, and with them /health). uvicorn's own options where it has one.
    header_timeout_s: float = Field(
        10.0, gt=0, description="longest wait for a request's headers, from connect or the first byte"
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="largest request head (request line and headers); larger gets 431"
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="longest wait for a whole request body; a stalled upload gets 408"
    )
    keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    max_connections: int = Field(
        2048,
        ge=1,
        description="open connections (and tasks) before new requests get 503 (uvicorn limit_concurrency)",
    )
    backlog: int = Field(2048, ge=1, description="connections the kernel queues before accept")
    # Ray Serve (service.cluster; the `cluster` extra)
    ray: str | None = Field(
        None,
        description="address of a Ray cluster (host:port of `ray start --head`): deploy the service there "
        "as a Ray Serve application (HTTP on host:port of every node) and exit; unset = this host only",
    )
    ray_fronts_min: int = Field(1, ge=1, description="fewest HTTP front replicas (autoscaled on requests)")
    ray_fronts_max: int = Field(4, ge=1, description="most HTTP front replicas")
    ray_target_ongoing: float = Field(
        4.0, gt=0, description="requests in progress per front replica that the autoscaler aims at"
    )
    ray_max_ongoing: int = Field(16, ge=1, description="requests in progress per front replica at most")
    ray_max_queued: int = Field(
        64, ge=1, description="requests waiting for a front replica before Serve answers 503 + Retry-After"
    )
    ray_engines: int = Field(
        0, ge=0, description="engine replicas (each holds the model); 0 = one per GPU in the cluster, or one"
    )
    ray_proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="where Serve runs its HTTP proxy: on every node, or on the head only"
    )
    # A closed list: anything else failed at start-up with "Unknown level" from logging.
    log_level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = Field(
        "info", description="debug, info, warning, error"
    )

    @model_validator(mode="before")
    @classmethod
    def _comma_lists(cls, data: dict[str, object]) -> dict[str, object]:
        for key in ("providers", "cors_origins"):
            if key in data:
                data[key] = _split(data[key])
        for key in ("workers", "state_dir", "ray", "train_on_ray", "database_url"):
            if data.get(key) == "":  # a deployment file passing the default through
                data[key] = None
        return data

    @model_validator(mode="after")
    def _derive_from_machine(self) -> "Settings":
        cpus = usable_cpus()
        if self.workers is None:
            self.workers = cpus
        self.intra_op_threads = self.intra_op_threads or cpus
        self.preprocess_threads = self.preprocess_threads or cpus
        # Two per core: a worker that has sent its square waits for the event loop to hand it the
        # next image, and with one per core that wait leaves the cores idle under load.
        self.decode_workers = self.decode_workers or 2 * cpus
        self.decode_memory_mb = self.decode_memory_mb or memory_limit() / 4 / 2**20
        self.upload_memory_mb = self.upload_memory_mb or memory_limit() / 8 / 2**20
        return self

    @model_validator(mode="after")
    def _limits_fit(self) -> "Settings":
        if self.max_files > self.max_queue_images:
            raise ValueError("max_files must not exceed max_queue_images, or such requests never fit")
        if self.upload_memory_mb < self.max_upload_mb:
            raise ValueError(
                "upload_memory_mb must be at least max_upload_mb, or the largest uploads never fit"
            )
        return self

    @property
    def state_path(self) -> Path:
        return self.state_dir or self.weights_dir

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def decode_memory_bytes(self) -> int:
        return int(self.decode_memory_mb * 2**20)

    @property
    def upload_memory_bytes(self) -> int:
        return int(self.upload_memory_mb * 2**20)


@cache
def get_settings() -> Settings:
    return Settings()


def from_command_line(args: list[str] | None = None) -> Settings:
    """Settings from the environment, overridden by ``args`` (default: sys.argv); ``--help``
    prints every setting and exits, an unknown option exits with argparse's message."""
    return CliApp.run(Settings, cli_args=args)
