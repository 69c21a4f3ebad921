"""The service as a Ray Serve application: ``Front``, the one-host app (same routes, same OpenAPI
document) as the ingress deployment, autoscaled on requests in progress; ``Engine``, the model and
the batcher, one replica per GPU. The model in service is the app's config (``user_config``:
``{"model": file name}``) of both deployments; activating one deploys the app again with only that
changed, which Serve applies in place: every replica's ``reconfigure``, no replica restarted.

Deploying again from inside a replica (``serve.run`` with the same code version) is chosen over a
controller actor of our own: Serve already tracks which replicas have the new config, restarts
replicas with it, and ``serve.run`` returns once every replica has it; a user's ``serve status``
shows the config in service."""

import hashlib
import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from service.cluster.engine import EngineReplica, RayEngine
from service.cluster.model import ClusterRegistry, Description
from service.core.config import Settings
from service.main import create_app
from service.model_registry import NO_MODEL_HINT, ModelNotFound, ModelRegistry

log = logging.getLogger(__name__)
FRONT, ENGINE = "Front", "Engine"
APP = "alexnet"  # the Serve application's name


@serve.ingress()
class Front:
    """An HTTP front replica: the app's routes, its gates and its images' decoding."""

    def __init__(self, settings: Settings, plan: "Plan", engine: DeploymentHandle) -> None:
        self.settings, self.plan, self.engine = settings, plan, engine
        self.registry = ClusterRegistry(settings, self._check, self._update_config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.settings, registry=self.registry, engine=partial(RayEngine, self.engine))

    async def reconfigure(self, config: dict[str, Any]) -> None:
        described: Description = await self.engine.describe.remote(str(config["model"]))
        self.registry.show(described)

    def _check(self, name: str) -> Description:
        try:
            return self.engine.describe.remote(name).result()
        except RayTaskError as exc:  # the engine replica's own error, without Ray's traceback
            raise exc.cause from None

    def _update_config(self, name: str) -> None:
        deploy(self.settings, name, self.plan)


def code_version(settings: Settings) -> str:
    """The same for every deployment of these settings: a new config is then applied in place."""
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Plan:
    """What the cluster looked like at deployment: kept by the fronts, so that an activation
    deploys the same replicas (a change there would restart them instead of reconfiguring)."""

    engines: int
    engine_resources: dict[str, float]  # one GPU each, or a CPU
    fronts_per_node: int  # the fronts spread over the nodes: a node removed takes only its share


def make_plan(settings: Settings) -> Plan:
    """One engine replica per GPU where the cluster has GPUs and the settings name the CUDA
    provider, else one on a CPU (or ``ray_engines``); the fronts spread over the nodes."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    nodes = max(1, sum(1 for node in ray.nodes() if node["Alive"]))
    per_node = math.ceil(max(settings.ray_fronts_min, settings.ray_fronts_max) / nodes)
    if gpus and "CUDAExecutionProvider" in settings.providers:
        return Plan(settings.ray_engines or gpus, {"num_gpus": 1}, per_node)
    return Plan(settings.ray_engines or 1, {"num_cpus": 1}, per_node)


def application(settings: Settings, model: str, plan: Plan) -> serve.Application:
    """The app serving ``model`` (a file name in the weights directory)."""
    config = {"model": model}
    version = code_version(settings)
    engine = serve.deployment(EngineReplica, name=ENGINE).options(
        num_replicas=plan.engines,
        ray_actor_options=plan.engine_resources,
        user_config=config,
        max_ongoing_requests=settings.max_queue_images,
        version=version,
        _internal=True,  # a fixed code version: Serve otherwise draws one per deployment
    )
    front = serve.deployment(Front, name=FRONT).options(
        autoscaling_config={
            "min_replicas": settings.ray_fronts_min,
            "max_replicas": max(settings.ray_fronts_min, settings.ray_fronts_max),
            "target_ongoing_requests": settings.ray_target_ongoing,
        },
        ray_actor_options={"num_cpus": 0},  # fronts wait on I/O; their decode workers are processes
        max_replicas_per_node=plan.fronts_per_node,
        user_config=config,
        max_ongoing_requests=settings.ray_max_ongoing,
        max_queued_requests=settings.ray_max_queued,
        backpressure_config={"status_code": 503, "retry_after_s": 1},
        version=version,
        _internal=True,
    )
    return front.bind(settings, plan, engine.bind(settings))


def deploy(settings: Settings, model: str, plan: Plan | None = None) -> None:
    """Deploy (or update in place) the app; returns once every replica serves ``model``."""
    plan = plan or make_plan(settings)
    serve.run(application(settings, model, plan), name=APP, route_prefix="/")


def initial_model(settings: Settings) -> str:
    """The model file to deploy with: as the one-host server chooses it at start-up."""
    registry = ModelRegistry(settings)
    try:
        if chosen := registry.chosen():
            return chosen.name
    except ModelNotFound as exc:
        raise SystemExit(f"{exc}: {NO_MODEL_HINT}") from None
    available = registry.available()
    if not available:
        raise SystemExit(f"no model in {settings.weights_dir}: {NO_MODEL_HINT}")
    return available[0].name


def run_on_ray(settings: Settings) -> int:
    """``alexnet-serve --ray ADDRESS``: deploy the app on that cluster, then leave it running."""
    import ray

    # A training job sent to any front runs on this cluster as Ray Train workers, not in the front.
    settings = settings.model_copy(update={"train_on_ray": settings.train_on_ray or settings.ray})
    ray.init(address=settings.ray, log_to_driver=False)
    http = {"host": settings.host, "port": settings.port}
    serve.start(proxy_location=settings.ray_proxy_location, http_options=http)
    model = initial_model(settings)
    deploy(settings, model)
    log.info("serving %s on the Ray cluster at %s (HTTP port %d)", model, settings.ray, settings.port)
    return 0
