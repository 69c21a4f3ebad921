"""What a gallery holds and answers, apart from its storage (``service.gallery``)."""

import io
from dataclasses import dataclass

from PIL import Image

from alexnet_core.errors import StatusError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
THUMB_SIDE = 96


class GalleryError(StatusError):
    def __init__(self, status_code: int, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(status_code, detail)
        self.retry_after_s = retry_after_s  # a Retry-After header: the condition passes by itself


class GalleryBusy(GalleryError):
    """Another process held the database's write lock for over BUSY_TIMEOUT_S: load, retry."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(status_code, detail, retry_after_s=1)


@dataclass(frozen=True)
class Item:
    id: str
    label: str | None
    key: int  # the int64 id FAISS holds for this vector
    added_at: str


@dataclass(frozen=True)
class Neighbour:
    item: Item
    distance: float  # Euclidean (FAISS returns its square)


def thumbnail(image: Image.Image) -> bytes:
    small = image.copy()
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, "PNG")
    return buffer.getvalue()
