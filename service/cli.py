"""``alexnet-serve``: the settings from the environment and the command line, then the server's
processes (``service.supervisor``), or with ``--workers 0`` the whole service in this process, or
with ``--ray ADDRESS`` a Ray Serve application on that cluster (``service.cluster``).
Imports only what the supervisor needs: the web stack and the model runtime load in the
processes that use them."""

import logging

from service.core.config import from_command_line
from service.core.http import raise_descriptor_limit


def run(args: list[str] | None = None) -> None:
    settings = from_command_line(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.ray:  # the cluster's replicas serve; this process deploys and exits
        try:
            from service.cluster.app import run_on_ray
        except ModuleNotFoundError as exc:
            raise SystemExit(f"--ray needs the `cluster` extra ({exc}): pip install '.[cluster]'") from None
        raise SystemExit(run_on_ray(settings))
    raise_descriptor_limit(settings.max_connections + 256)  # + model, pool, log and job files
    if settings.decode_device == "cuda":  # refused here, before any process starts, with the reason
        from service.device_route import DeviceDecodeUnavailable, decode_device

        try:
            decode_device(settings.decode_device, settings.providers, settings.workers or 0)
        except DeviceDecodeUnavailable as exc:
            raise SystemExit(f"alexnet-serve: {exc}") from None
    if settings.workers:
        from service.supervisor import serve_with_fronts

        raise SystemExit(serve_with_fronts(settings))
    import uvicorn

    from service.core.http import server_config
    from service.main import create_app

    uvicorn.Server(server_config(create_app(settings), settings)).run()
