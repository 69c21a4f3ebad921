"""The Open Inference Protocol (KServe v2, as Triton speaks it): the same client (``tritonclient``)
for this service and for a Triton server holding the exported repository.

One model, ``alexnet``, whose version is the served model's. Inputs: the model's own tensor (the
metadata says which: ten normalised crops per image, or central squares) or ``image_bytes``, a
BYTES tensor of encoded images that get the full /predict pipeline. Output ``probabilities``
(images, classes), or with Triton's classification extension (``parameters.classification: k``)
the top k of each image as BYTES "score:index:label". Every inference goes through the service's
inference queue (admission, batching, backpressure), like /predict. Errors: ``{"error": "..."}``.
"""

import asyncio
import functools
from concurrent.futures import Executor
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from alexnet_core.images import ImageInputError
from alexnet_core.pipeline import top_k
from service.core.config import Settings
from service.core.metrics import Metrics
from service.deps import EngineDep, MetricsDep, PoolDep, SettingsDep
from service.engine.local import Engine, ServedModel
from service.engine.remote import TensorElsewhere
from service.image_admission import ServiceUnavailable
from service.routers.v2_codec import (
    HEADER_LENGTH,
    InputTensor,
    OutputTensor,
    ProtocolError,
    bad,
    encode_response,
    parse_infer_request,
)

# Not in /openapi.json: the protocol has its own specification (KServe's Open Inference Protocol,
# REST), and its binary tensor bodies are beyond what OpenAPI can describe, so the generated
# schema would promise less than these routes accept (tests/test_v2.py covers them instead).
router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], include_in_schema=False)

MODEL_NAME = "alexnet"
BYTES_INPUT = "image_bytes"
OUTPUT = "probabilities"
EXTENSIONS = ["binary_tensor_data", "classification"]


def error(exc: ProtocolError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


def served(engine: Engine, name: str, version: str | None) -> ServedModel:
    """The model in service, if ``name`` (and ``version``, when given) designate it."""
    if name != MODEL_NAME:
        raise ProtocolError(404, f"unknown model {name!r}: this server has one model, {MODEL_NAME!r}")
    try:
        classifier = engine.served()
    except HTTPException as exc:
        raise ProtocolError(503, str(exc.detail), {"Retry-After": "1"}) from None
    if version not in (None, "", classifier.version):
        raise ProtocolError(
            404, f"version {version!r} of {MODEL_NAME!r} is not served ({classifier.version} is)"
        )
    return classifier


def tensor_input(classifier: ServedModel) -> dict[str, Any]:
    meta = classifier.metadata
    if meta.input_kind == "square":
        size = meta.resize_size
        return {"name": meta.input_name, "datatype": "UINT8", "shape": [-1, size, size, 3]}
    size = meta.input_size
    return {"name": meta.input_name, "datatype": "FP32", "shape": [-1, 3, size, size]}


@router.get("/health/live", summary="Liveness (200: live)")
async def live() -> Response:
    return Response(status_code=200)


@router.get(
    "/health/ready", summary="Readiness (200: a model is loaded; 400 otherwise, as the protocol says)"
)
async def ready(engine: EngineDep) -> Response:
    try:
        engine.served()
    except HTTPException as exc:
        return error(ProtocolError(400, f"not ready: {exc.detail}"))
    return Response(status_code=200)


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "alexnet-serve", "version": "0.1.0", "extensions": EXTENSIONS}


@router.get("/models/{name}", summary="Model metadata: inputs and outputs")
@router.get("/models/{name}/versions/{version}", summary="Model metadata of one version")
async def model_metadata(name: str, engine: EngineDep, version: str | None = None) -> Any:
    try:
        classifier = served(engine, name, version)
    except ProtocolError as exc:
        return error(exc)
    meta = classifier.metadata
    return {
        "name": MODEL_NAME,
        "versions": [classifier.version],
        "platform": "onnxruntime_onnx",
        "inputs": [tensor_input(classifier), {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, meta.num_classes]}],
    }


@router.get("/models/{name}/ready", summary="Model readiness (200 or 400)")
@router.get("/models/{name}/versions/{version}/ready", summary="Readiness of one version")
async def model_ready(name: str, engine: EngineDep, version: str | None = None) -> Response:
    try:
        served(engine, name, version)
    except ProtocolError as exc:
        return error(ProtocolError(400 if exc.status == 503 else exc.status, exc.message))
    return Response(status_code=200)


def model_tensor(tensor: InputTensor, classifier: ServedModel, max_files: int) -> tuple[np.ndarray, int]:
    """The model's own input, checked against its metadata: (array, images)."""
    expected = tensor_input(classifier)
    if tensor.datatype != expected["datatype"]:
        raise bad(f"input {tensor.name!r}: datatype {tensor.datatype}, expected {expected['datatype']}")
    shape = expected["shape"]
    if len(tensor.shape) != len(shape) or tensor.shape[1:] != shape[1:] or tensor.shape[0] < 1:
        raise bad(f"input {tensor.name!r}: shape {tensor.shape}, expected {shape} (-1: any batch)")
    assert isinstance(tensor.value, np.ndarray)
    per_image = classifier.metadata.rows_per_image
    if tensor.shape[0] % per_image:
        raise bad(f"input {tensor.name!r}: {tensor.shape[0]} crops, not a multiple of {per_image} per image")
    images = tensor.shape[0] // per_image
    if images > max_files:
        raise bad(f"input {tensor.name!r}: {images} images, at most {max_files} per request")
    return tensor.value, images


def image_bytes(tensor: InputTensor, settings: Settings) -> list[bytes]:
    """The encoded images of the BYTES input, checked for their number."""
    if tensor.datatype != "BYTES":
        raise bad(f"input {BYTES_INPUT!r}: datatype {tensor.datatype}, expected BYTES")
    assert isinstance(tensor.value, list)
    if not 1 <= len(tensor.value) <= settings.max_files:
        raise bad(f"input {BYTES_INPUT!r}: {len(tensor.value)} images, 1 to {settings.max_files} per request")
    return tensor.value


def requested_outputs(
    request_outputs: list[dict[str, Any]] | None, binary_default: bool
) -> list[tuple[int, bool]]:
    """(classification k or 0, binary) for each requested output, in order."""
    if request_outputs is None:
        return [(0, binary_default)]
    result = []
    for spec in request_outputs:
        if spec.get("name") != OUTPUT:
            raise bad(f"unknown output {spec.get('name')!r}: the model's output is {OUTPUT!r}")
        parameters = spec.get("parameters") or {}
        k = parameters.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise bad(f"output {OUTPUT!r}: classification must be a positive integer, not {k!r}")
        result.append((k, bool(parameters.get("binary_data", binary_default))))
    return result


def classification(probabilities: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Triton's classification output: the top k of each image as b"score:index:label"."""
    rows = [[f"{p:f}:{i}:{labels[i]}".encode() for i, p in top_k(row, k)] for row in probabilities]
    return np.array(rows, dtype=object)


async def run_inference(
    request: Request,
    name: str,
    version: str | None,
    *,
    engine: Engine,
    settings: Settings,
    pool: Executor,
    metrics: Metrics,
) -> Response:
    classifier = served(engine, name, version)
    body = await request.body()
    # Off the event loop: JSON tensors can be tens of MB of numbers.
    parse = functools.partial(parse_infer_request, body, request.headers.get(HEADER_LENGTH))
    parsed = await asyncio.get_running_loop().run_in_executor(pool, parse)
    if len(parsed.inputs) != 1:
        raise bad(f"send one input, {classifier.metadata.input_name!r} or {BYTES_INPUT!r}")
    (tensor,) = parsed.inputs
    outputs = requested_outputs(parsed.outputs, parsed.binary_output)
    if tensor.name == BYTES_INPUT:
        data = image_bytes(tensor, settings)
        labels = [f"{BYTES_INPUT}[{index}]: " for index in range(len(data))]
        images = len(data)
        try:
            result = await engine.run(classifier, data, labels)
        except ImageInputError as exc:
            raise ProtocolError(exc.status_code, exc.detail) from None
    elif tensor.name == classifier.metadata.input_name:
        batch, images = model_tensor(tensor, classifier, settings.max_files)
        try:
            result = await engine.run_tensor(classifier, batch, images)
        except TensorElsewhere:  # in a front: the engine process's app runs it
            return await request.app.state.proxy.forward(request, body)
    else:
        raise bad(f"unknown input {tensor.name!r}: {classifier.metadata.input_name!r} or {BYTES_INPUT!r}")
    metrics.images.inc(images)
    probabilities = result.probabilities.astype(np.float32)
    tensors = [
        OutputTensor(OUTPUT, "BYTES", classification(probabilities, k, classifier.metadata.labels), binary)
        if k
        else OutputTensor(OUTPUT, "FP32", probabilities, binary)
        for k, binary in outputs
    ]
    header: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": classifier.version}
    if parsed.id is not None:
        header["id"] = parsed.id
    content, header_length = encode_response(header, tensors)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)}
    )


@router.post("/models/{name}/infer", summary="Inference (JSON or binary tensors)")
@router.post("/models/{name}/versions/{version}/infer", summary="Inference on one version")
async def infer(
    request: Request,
    name: str,
    engine: EngineDep,
    settings: SettingsDep,
    pool: PoolDep,
    metrics: MetricsDep,
    version: str | None = None,
) -> Response:
    try:
        return await run_inference(
            request, name, version, engine=engine, settings=settings, pool=pool, metrics=metrics
        )
    except ProtocolError as exc:
        return error(exc)
    except ServiceUnavailable as exc:
        return error(ProtocolError(503, str(exc), {"Retry-After": "1"}))
