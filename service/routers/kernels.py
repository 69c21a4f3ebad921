import asyncio
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status

from service.deps import ClassifierDep
from service.kernels import KernelError, kernels_png
from service.schemas import error_responses

router = APIRouter(tags=["model"])


@router.get(
    "/model/kernels.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the first layer's kernels as a grid"},
        **error_responses({422: "a bad `scale`, or no RGB conv1 to draw", 503: "no model loaded"}),
    },
    summary="The first layer's kernels (the paper's Figure 3), from the model in service",
)
async def kernels(
    classifier: ClassifierDep,
    scale: Annotated[int, Query(ge=1, le=16, description="pixels per weight")] = 4,
) -> Response:
    try:
        # Reading a 200+ MB protobuf takes a while: off the event loop (cached afterwards).
        png = await asyncio.to_thread(
            kernels_png, classifier.path, classifier.sha256, classifier.metadata.layout, scale
        )
    except KernelError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return Response(
        png,
        media_type="image/png",
        headers={"Cache-Control": "no-cache", "ETag": f'"{classifier.sha256[:32]}-{scale}"'},
    )
