"""Property tests for image input: whatever the bytes, ``preprocess`` either returns ten finite
crops or raises ``ImageInputError`` with a 4xx status, and ``POST /predict`` answers 200 with a
valid top-k or a 4xx JSON error whose ``detail`` is a string; never a 5xx, never another exception.

Inputs: random bytes (also behind a real format's signature, so that they reach a decoder), real
photos in every supported format mutated by bit flips, truncation, overwritten and inserted byte
runs, overwritten header fields (dimensions, bit depths) and headers spliced from other formats;
and valid images in every Pillow mode and many sizes, from 1x1 through extreme aspect ratios
(1x5000, 5000x1) to a few megapixels. The pixel limit varies too, so that the 413 path runs.
"""

import struct
from collections.abc import Callable, Iterator
from functools import cache

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image

from alexnet_core.images import FORMATS, ImageInputError
from alexnet_core.pipeline import preprocess
from tests.images import encode, photo

# (resize, crop) of the two kinds of model served: ImageNet's and the 64-pixel digits models.
GEOMETRIES = [(256, 224), (73, 64)]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
MAX_PIXELS = [64_000_000, 1_000_000, 5_000]  # the default, and limits the inputs run into
SIGNATURES = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"BM", b"II*\x00", b"MM\x00*"]
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@cache
def seeds() -> dict[str, bytes]:
    """Small real files, one per format and some variants, for the mutators to work on."""
    small = photo().resize((96, 64), Image.Resampling.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [small, small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "jpeg": encode(small, "JPEG", quality=85),
        "jpeg-progressive-exif": encode(small, "JPEG", progressive=True, exif=exif),
        "jpeg-cmyk": encode(small.convert("CMYK"), "JPEG"),
        "png": encode(small, "PNG"),
        "png-rgba": encode(small.convert("RGBA"), "PNG"),
        "png-16bit": encode(small.convert("I;16"), "PNG"),
        "png-palette": encode(small.convert("P"), "PNG", transparency=0),
        "gif-animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        "webp": encode(small, "WEBP", quality=80),
        "webp-lossless-alpha": encode(small.convert("RGBA"), "WEBP", lossless=True),
        "tiff": encode(small, "TIFF"),
        "tiff-deflate-float": encode(small.convert("F"), "TIFF", compression="tiff_deflate"),
        "bmp": encode(small, "BMP"),
    }


def flip_bits(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, bit in flips:
        out[position % len(out)] ^= 1 << bit
    return bytes(out)


def overwrite(data: bytes, position: int, chunk: bytes) -> bytes:
    position %= len(data)
    return data[:position] + chunk + data[position + len(chunk) :]


@st.composite
def mutation(draw: st.DrawFn, other: bytes) -> Callable[[bytes], bytes]:
    kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "header", "insert", "splice", "cut"]))
    if kind == "flip":
        flips = draw(st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 7)), min_size=1, max_size=16))
        return lambda d: flip_bits(d, flips)
    if kind == "truncate":
        fraction = draw(st.floats(0, 1, exclude_max=True))
        return lambda d: d[: int(len(d) * fraction)]
    if kind == "overwrite":
        position, chunk = draw(st.integers(0, 2**20)), draw(st.binary(min_size=1, max_size=64))
        return lambda d: overwrite(d, position, chunk)
    if kind == "header":
        # The first bytes hold the dimensions, bit depth, colour type: big, zero and odd values.
        position = draw(st.integers(0, 48))
        value = draw(
            st.sampled_from([0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1)
        )
        fmt = draw(st.sampled_from([">I", "<I", ">H", "<H", "B"]))
        packed = struct.pack(fmt, value % 2 ** (8 * struct.calcsize(fmt)))
        return lambda d: overwrite(d, position, packed)
    if kind == "insert":
        position, chunk = draw(st.integers(0, 2**20)), draw(st.binary(min_size=1, max_size=256))
        return lambda d: d[: position % len(d)] + chunk + d[position % len(d) :]
    if kind == "splice":
        # Another format's header on this file's body, or this header on the other's body.
        cut, theirs_first = draw(st.integers(1, 64)), draw(st.booleans())
        return lambda d: other[:cut] + d[cut:] if theirs_first else d[:cut] + other[cut:]
    start, length = draw(st.integers(0, 2**20)), draw(st.integers(1, 512))  # cut a run out
    return lambda d: d[: start % len(d)] + d[start % len(d) + length :]


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    names = sorted(seeds())
    data = seeds()[draw(st.sampled_from(names))]
    other = seeds()[draw(st.sampled_from(names))]
    for mutate in draw(st.lists(mutation(other), min_size=1, max_size=3)):
        if data:
            data = mutate(data)
    return data


def random_bytes() -> st.SearchStrategy[bytes]:
    return st.binary(max_size=4096) | st.builds(
        lambda magic, rest: magic + rest, st.sampled_from(SIGNATURES), st.binary(max_size=2048)
    )


# Modes Pillow can write in at least one supported format; tried in this order of formats.
MODES = [
    "1",
    "L",
    "P",
    "RGB",
    "RGBA",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "I;16",
    "I;16B",
    "F",
    "LA",
    "PA",
    "RGBX",
]
SIZES = st.one_of(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.tuples(st.integers(1, 3), st.integers(1000, 5000)),  # extreme aspect ratios, both ways
    st.tuples(st.integers(1000, 5000), st.integers(1, 3)),
    st.tuples(st.integers(200, 900), st.integers(200, 900)),
    st.sampled_from([(1, 1), (1, 5000), (5000, 1), (2000, 1500)]),  # 1x1 ... 3 MP
)


@st.composite
def generated_images(draw: st.DrawFn) -> tuple[bytes, str, tuple[int, int]]:
    mode, (width, height) = draw(st.sampled_from(MODES)), draw(SIZES)
    content = draw(st.sampled_from(["noise", "flat", "gradient"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    if content == "noise":
        base = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    elif content == "gradient":
        ramp = np.linspace(0, 255, width * height, dtype=np.float32).reshape(height, width)
        base = Image.fromarray(np.stack([ramp, ramp[::-1], ramp.T[::-1].T], axis=-1).astype(np.uint8))
    if mode == "F":  # float images come in any range, NaN and infinities included
        values = rng.normal(0, draw(st.sampled_from([1.0, 1e4])), (height, width)).astype(np.float32)
        values.flat[: draw(st.integers(0, 3))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        image = Image.fromarray(values, mode="F")
    elif mode.startswith("I;16"):
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).convert(mode)
    else:
        image = base.convert(mode) if mode not in ("LAB", "HSV", "PA") else base.convert("RGB").convert(mode)
    first = draw(st.sampled_from(FORMATS))
    for fmt in [first, *FORMATS]:
        try:
            return encode(image, fmt), mode, (width, height)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # this format cannot hold this mode; the next one may
    raise AssertionError(f"no format can hold mode {mode}")


def check(data: bytes, max_pixels: int, geometry: tuple[int, int]) -> int:
    """The property itself; returns the status (200 for success) for the callers' own checks."""

    def record(status: int) -> None:  # the mix, shown by pytest --hypothesis-show-statistics
        if currently_in_test_context():
            event(f"status {status}")

    resize, crop = geometry
    try:
        result = preprocess(data, resize=resize, crop=crop, mean=MEAN, std=STD, max_pixels=max_pixels)
    except ImageInputError as exc:
        record(exc.status_code)
        assert 400 <= exc.status_code < 500 and isinstance(exc.detail, str) and exc.detail
        return exc.status_code
    record(200)
    assert result.batch.shape == (10, 3, crop, crop) and result.batch.dtype == np.float32
    assert np.isfinite(result.batch).all()
    return 200


@settings(FUZZ, max_examples=300)
@given(data=random_bytes(), max_pixels=st.sampled_from(MAX_PIXELS), geometry=st.sampled_from(GEOMETRIES))
def test_random_bytes(data: bytes, max_pixels: int, geometry: tuple[int, int]) -> None:
    status = check(data, max_pixels, geometry)
    if not data:
        assert status == 400


@settings(FUZZ, max_examples=1000)
@given(data=mutated_files(), max_pixels=st.sampled_from(MAX_PIXELS), geometry=st.sampled_from(GEOMETRIES))
def test_mutated_real_files(data: bytes, max_pixels: int, geometry: tuple[int, int]) -> None:
    check(data, max_pixels, geometry)


@settings(FUZZ, max_examples=200)
@given(image=generated_images(), geometry=st.sampled_from(GEOMETRIES))
def test_every_mode_and_size_is_accepted(
    image: tuple[bytes, str, tuple[int, int]], geometry: tuple[int, int]
) -> None:
    data, mode, (width, height) = image
    event(f"shape {'tall' if height > 8 * width else 'wide' if width > 8 * height else 'square-ish'}")
    event(f"size {'>= 1 MP' if width * height >= 10**6 else '< 1 MP'}")
    # A valid image within the pixel limit is classified, whatever its mode, size or shape...
    assert check(data, 64_000_000, geometry) == 200, (mode, width, height)
    # ...and one over the limit is a 413 before it is decoded.
    if width * height > 1:
        assert check(data, width * height - 1, geometry) == 413


def test_extreme_aspect_ratio_stays_cheap() -> None:
    # A 2 KB PNG of 1x1,000,000 pixels (within the limit) was resized whole to 256x256,000,000
    # before the central square was cut: hundreds of GB. Only the square is resampled now.
    data = encode(Image.new("L", (1, 1_000_000), 200), "PNG")
    assert len(data) < 4096
    assert check(data, 64_000_000, (256, 224)) == 200
    assert check(encode(Image.new("L", (1_000_000, 1), 200), "PNG"), 64_000_000, (256, 224)) == 200


# ----------------------------------------------------------------------------- through HTTP


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


def assert_valid_top_k(body: dict, files: int, top_k: int) -> None:
    assert len(body["results"]) == files
    for result in body["results"]:
        predictions = result["predictions"]
        assert len(predictions) == top_k
        probabilities = [p["probability"] for p in predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0 <= p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-6
        indices = [p["index"] for p in predictions]
        assert len(set(indices)) == top_k and all(0 <= i < 1000 for i in indices)


@settings(FUZZ, max_examples=60, suppress_health_check=list(HealthCheck))
@given(
    files=st.lists(st.one_of(mutated_files(), random_bytes()), min_size=1, max_size=3),
    top_k=st.integers(1, 1000),
    # Without a file name a part is a form field, not a file: a 422 ("Expected UploadFile").
    filename=st.text(min_size=1, max_size=40) | st.sampled_from(["", None, "../../etc/passwd", "a\\b.jpg"]),
)
def test_hostile_uploads_over_http(
    http: httpx.Client, files: list[bytes], top_k: int, filename: str | None
) -> None:
    parts = [("files", (filename, data, "application/octet-stream")) for data in files]
    response = http.post("/predict", files=parts, params={"top_k": top_k})
    event(f"status {response.status_code}")
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:  # a mutation can leave a file decodable
        assert_valid_top_k(body, len(files), top_k)
    else:
        assert 400 <= response.status_code < 500 and isinstance(body["detail"], str) and body["detail"]
    assert http.get("/health").status_code == 200


@settings(FUZZ, max_examples=20, suppress_health_check=list(HealthCheck))
@given(
    images=st.lists(generated_images(), min_size=1, max_size=3),
    top_k=st.integers(1, 1000),
    filename=st.text(min_size=1, max_size=40),
)
def test_valid_images_over_http(
    http: httpx.Client, images: list[tuple[bytes, str, tuple[int, int]]], top_k: int, filename: str
) -> None:
    parts = [("files", (filename, data, "application/octet-stream")) for data, _, _ in images]
    response = http.post("/predict", files=parts, params={"top_k": top_k})
    assert response.status_code == 200, (response.text, [(mode, size) for _, mode, size in images])
    assert_valid_top_k(response.json(), len(images), top_k)
