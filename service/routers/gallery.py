"""Feature search over HTTP: /embed, /gallery, /similar. The logic lives in service.gallery and
service.embedding; these routes read uploads, call it off the event loop and shape the answers."""

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import (
    APIRouter,
    Depends,
    File,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    UploadFile,
    status,
)
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile as StarletteUpload

from alexnet_core.session import OnnxClassifier
from service.core.security import ApiKey
from service.deps import ClassifierDep, EngineDep, SettingsDep
from service.embedding import AGGREGATION, NoFeatures, aggregation, feature_dim
from service.engine.local import EngineResult
from service.gallery import Galleries, Gallery
from service.gallery_items import ID_PATTERN, GalleryError, Item, thumbnail
from service.preparation import read_uploads
from service.routers.predict import Uploads, top_k_predictions
from service.schemas import Prediction, error_responses

router = APIRouter(tags=["feature search"])
T = TypeVar("T")
MAX_LABEL = 200


class Embedding(BaseModel):
    filename: str | None
    vector: list[float] = Field(description="fc7 after ReLU, the mean over the image's crops")


class EmbedResponse(BaseModel):
    model_version: str
    aggregation: str = Field(
        AGGREGATION, description="how an image's crops make one vector: the ten, or five without mirrors"
    )
    dim: int
    results: list[Embedding]


class GalleryItem(BaseModel):
    id: str
    label: str | None
    added_at: str
    thumbnail_url: str


class GalleryListing(BaseModel):
    model_version: str
    count: int
    items: list[GalleryItem]


class Neighbour(GalleryItem):
    distance: float = Field(ge=0, description="Euclidean distance between the feature vectors")


class SimilarResponse(BaseModel):
    model_version: str
    aggregation: str = AGGREGATION
    neighbours: list[Neighbour] = Field(description="nearest first")
    predictions: list[Prediction] = Field(description="the query's top classes, from the same inference call")


UPLOAD_ERRORS: dict[int, str | None] = {
    400: "no file, an empty file, or too many files",
    409: "the model in service has no features output",
    413: "body or image over the limits",
    415: "not an image in a supported format",
    422: "corrupt image, or a bad parameter",
    503: "no model loaded, queue full, timed out, or the gallery's files are corrupt",
}
KEY_ERRORS: dict[int, str | None] = {401: "missing or wrong API key", 403: "no API key configured"}
ITEM_ERRORS: dict[int, str | None] = {
    404: "no such item",
    409: "no features output or another model's gallery",
    422: "a malformed id",
    503: "corrupt gallery files",
}


@contextmanager
def http_errors() -> Iterator[None]:
    try:
        yield
    except GalleryError as exc:  # busy, or a database that cannot be reached: Retry-After
        retry = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        raise HTTPException(exc.status_code, exc.detail, headers=retry) from None
    except NoFeatures as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None


async def galleries(request: Request) -> Galleries:
    state = request.app.state
    database = getattr(state, "database", None)  # opened at start-up
    shared = database if database is not None and database.shared else None
    if state.read_only and shared is None:  # no writable place for the galleries' files
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"the gallery is disabled: {state.read_only}"
        )
    if getattr(state, "galleries", None) is None:  # no await before the assignment: no race
        state.galleries = Galleries(state.settings.state_path, state.settings.gallery_max_items, shared)
    return state.galleries


async def open_gallery(request: Request, classifier: OnnxClassifier) -> Gallery:
    store = await galleries(request)
    with http_errors():
        dim = feature_dim(classifier)
    return await asyncio.to_thread(store.get, classifier.version, classifier.sha256, dim)


async def in_gallery(request: Request, classifier: OnnxClassifier, action: Callable[[Gallery], T]) -> T:
    """``action`` on the model's gallery, off the event loop, its errors as HTTP errors."""
    gallery = await open_gallery(request, classifier)
    with http_errors():
        return await asyncio.to_thread(action, gallery)


def _item(item: Item) -> GalleryItem:
    return GalleryItem(
        id=item.id,
        label=item.label,
        added_at=item.added_at,
        thumbnail_url=f"/gallery/{item.id}/thumbnail.png",
    )


@dataclass
class Embedder:
    """The model in service and the engine the routes that embed images run them through."""

    classifier: ClassifierDep
    settings: SettingsDep
    engine: EngineDep

    async def embed_uploads(self, uploads: list[StarletteUpload], squares: bool = False) -> EngineResult:
        """The images through the engine (admission, decode workers, the batcher): both outputs
        from one inference call; ``squares`` keeps the decoded squares (for a thumbnail)."""
        data, labels = await read_uploads(uploads, self.settings.max_files)
        with http_errors():
            feature_dim(self.classifier)  # refuse a model without features before decoding anything
        return await self.engine.run(self.classifier, data, labels, features=True, squares=squares)


EmbedderDep = Annotated[Embedder, Depends()]


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=error_responses(UPLOAD_ERRORS),
    summary="Feature vector (fc7, 4096-d, mean over its crops) of each image",
)
async def embed_images(embedder: EmbedderDep, uploads: Uploads) -> EmbedResponse:
    result = await embedder.embed_uploads(uploads)
    return EmbedResponse(
        model_version=embedder.classifier.version,
        aggregation=aggregation(embedder.classifier),
        dim=result.features.shape[1],
        results=[
            Embedding(filename=u.filename, vector=v.tolist())
            for u, v in zip(uploads, result.features, strict=True)
        ],
    )


@router.post(
    "/similar",
    response_model=SimilarResponse,
    responses=error_responses(UPLOAD_ERRORS | {404: "the model's gallery is empty"}),
    summary="The k gallery images nearest to an image (Euclidean distance of feature vectors)",
)
async def similar(
    request: Request,
    embedder: EmbedderDep,
    file: Annotated[UploadFile, File(description="the query image")],
    k: Annotated[int, Query(ge=1, le=100, description="neighbours to return")] = 5,
    top_k: Annotated[int, Query(ge=1, le=1000, description="classes to return")] = 5,
) -> SimilarResponse:
    classifier = embedder.classifier
    gallery = await open_gallery(request, classifier)
    with http_errors():
        gallery.check()  # a corrupt or foreign gallery is refused before any work
    result = await embedder.embed_uploads([file])
    with http_errors():
        found = await asyncio.to_thread(gallery.search, result.features[0], k)
    meta = classifier.metadata
    return SimilarResponse(
        model_version=classifier.version,
        aggregation=aggregation(classifier),
        neighbours=[Neighbour(**_item(n.item).model_dump(), distance=n.distance) for n in found],
        predictions=top_k_predictions(result.probabilities[0], top_k, meta.labels, meta.wnids),
    )


@router.get(
    "/gallery",
    response_model=GalleryListing,
    responses=error_responses({409: ITEM_ERRORS[409], 503: ITEM_ERRORS[503]}),
    summary="The gallery of the model in service",
)
async def list_gallery(request: Request, classifier: ClassifierDep) -> Response:
    def listing(gallery: Gallery) -> Response:
        # Read and serialised in a worker thread: a large gallery's listing costs the event loop nothing.
        items = gallery.entries()
        body = GalleryListing(
            model_version=classifier.version, count=len(items), items=[_item(i) for i in items]
        )
        return Response(body.model_dump_json(), media_type="application/json")

    return await in_gallery(request, classifier, listing)


ADD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["id", "file"],
                "properties": {
                    "id": {"type": "string", "pattern": ID_PATTERN, "description": "the item's name"},
                    "label": {"type": "string", "maxLength": MAX_LABEL, "description": "optional label"},
                    "file": {"type": "string", "format": "binary", "description": "the image"},
                },
            }
        }
    },
}


@router.post(
    "/gallery",
    status_code=status.HTTP_201_CREATED,
    response_model=GalleryItem,
    dependencies=[ApiKey],
    openapi_extra={"requestBody": ADD_BODY},
    responses=error_responses(UPLOAD_ERRORS | KEY_ERRORS),
    summary="Add an image to the gallery of the model in service (key required)",
)
async def add_to_gallery(request: Request, embedder: EmbedderDep) -> GalleryItem:
    # The form is parsed here, after the key was checked: nothing is read for an unauthorised caller.
    form = await request.form(max_files=1, max_fields=2)
    item_id, label, upload = form.get("id"), form.get("label"), form.get("file")
    if not isinstance(item_id, str) or not item_id:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "form field `id` is required")
    if not Gallery.valid_id(item_id):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"id {item_id[:80]!r} must match {ID_PATTERN}"
        )
    if label is not None and (not isinstance(label, str) or len(label) > MAX_LABEL):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"`label` must be text of at most {MAX_LABEL} characters"
        )
    if not isinstance(upload, StarletteUpload):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "no image: send it as form field `file`")
    classifier = embedder.classifier
    gallery = await open_gallery(request, classifier)
    with http_errors():
        gallery.check()
    result = await embedder.embed_uploads([upload], squares=True)
    assert result.squares is not None and result.features is not None
    # From the square the decode worker returned (what the model saw): never a second decode.
    (square,) = result.squares
    thumb = await asyncio.to_thread(lambda: thumbnail(Image.fromarray(square)))
    with http_errors():
        item = await asyncio.to_thread(gallery.add, item_id, label or None, result.features[0], thumb)
    return _item(item)


ItemId = Annotated[str, Path(pattern=ID_PATTERN, description="the item's id")]


@router.delete(
    "/gallery/{item_id}",
    response_model=GalleryItem,
    dependencies=[ApiKey],
    responses=error_responses(KEY_ERRORS | ITEM_ERRORS | {409: "no features output"}),
    summary="Remove an image from the gallery (key required)",
)
async def remove_from_gallery(request: Request, classifier: ClassifierDep, item_id: ItemId) -> GalleryItem:
    return _item(await in_gallery(request, classifier, lambda gallery: gallery.remove(item_id)))


@router.get(
    "/gallery/{item_id}/thumbnail.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}},
        **error_responses(ITEM_ERRORS),
    },
    summary="A gallery image, small",
)
async def gallery_thumbnail(request: Request, classifier: ClassifierDep, item_id: ItemId) -> Response:
    png = await in_gallery(request, classifier, lambda gallery: gallery.thumbnail(item_id))
    return Response(png, media_type="image/png")
