import io

import numpy as np
import pytest
from PIL import Image

from alexnet_core.images import ImageInputError, decode
from alexnet_core.pipeline import center_square, crop_offsets, preprocess, ten_crop
from tests.images import big_photo_jpeg, encode, photo, photo_jpeg

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def quadrant_image(size: int = 256) -> np.ndarray:
    """Every pixel different: red = column, green = row, blue = a checker pattern."""
    rows, cols = np.mgrid[0:size, 0:size]
    return np.stack([cols % 256, rows % 256, ((rows // 7 + cols // 5) % 2) * 255], axis=-1).astype(np.uint8)


def test_ten_crops_are_the_papers() -> None:
    square = quadrant_image()
    crops = ten_crop(square, 224, [0.0, 0.0, 0.0], [1 / 255] * 3)  # identity normalisation
    assert crops.shape == (10, 3, 224, 224) and crops.dtype == np.float32
    # Computed independently: the four corners and the centre of the 256x256, and their mirrors.
    expected = [
        square[0:224, 0:224],
        square[0:224, 32:256],
        square[32:256, 0:224],
        square[32:256, 32:256],
        square[16:240, 16:240],
    ]
    expected += [e[:, ::-1] for e in expected]
    got = [c.transpose(1, 2, 0) for c in crops]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e.astype(np.float32))


def test_crop_offsets() -> None:
    assert crop_offsets(256, 224) == [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]


def test_normalisation() -> None:
    square = np.full((256, 256, 3), 128, dtype=np.uint8)
    crops = ten_crop(square, 224, MEAN, STD)
    for channel in range(3):
        assert crops[:, channel].mean() == pytest.approx((128 / 255 - MEAN[channel]) / STD[channel], rel=1e-5)


@pytest.mark.parametrize("transpose", [False, True], ids=["landscape", "portrait"])
def test_resize_shorter_side_then_centre(transpose: bool) -> None:
    pixels = quadrant_image(512)[:384]  # 512 wide, 384 high
    image = Image.fromarray(pixels.transpose(1, 0, 2).copy() if transpose else pixels)
    square = center_square(image, 256)
    assert square.shape == (256, 256, 3) and square.dtype == np.uint8
    # torchvision: long side int(256 * 512 / 384) = 341, crop offset = round((341 - 256) / 2) = 42.
    # Only the square's source region is resampled: equal to the full resize then crop up to the
    # rounding of the region's float coordinates (at most 1 grey level).
    if transpose:
        full = np.asarray(image.resize((256, 341), Image.Resampling.BILINEAR))[42:298]
    else:
        full = np.asarray(image.resize((341, 256), Image.Resampling.BILINEAR))[:, 42:298]
    difference = np.abs(square.astype(np.int16) - full)
    assert difference.max() <= 1
    assert (difference == 0).mean() > 0.8


def test_exif_orientation_6_matches_upright() -> None:
    upright = photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": stored turned 90 counter-clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    for fmt in ("PNG", "JPEG"):
        params = {"quality": 95} if fmt == "JPEG" else {}
        rotated = decode(encode(stored, fmt, exif=exif, **params), 256, 10**8)
        reference = decode(encode(upright, fmt, **params), 256, 10**8)
        assert rotated.size == reference.size == upright.size
        diff = np.abs(np.asarray(rotated, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
        assert diff.mean() < (0.01 if fmt == "PNG" else 3.0)
        without_exif = decode(encode(stored, fmt, **params), 256, 10**8)
        assert without_exif.size != upright.size  # the tag, not luck, made them equal


@pytest.mark.parametrize(
    "mode", ["L", "LA", "P", "PA-transparency", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr"]
)
def test_any_mode_becomes_rgb(mode: str) -> None:
    base = photo().resize((320, 240))
    if mode == "PA-transparency":
        image = base.convert("P")
        image.info["transparency"] = 0
    elif mode in ("I;16", "I"):
        grey = np.asarray(base.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(grey) if mode == "I;16" else Image.fromarray(grey.astype(np.int32))
        assert image.mode == mode
    elif mode == "F":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255.0, mode="F")
    else:
        image = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I", "F", "YCbCr", "LA") else "PNG"
    decoded = decode(encode(image, fmt), 256, 10**8)
    assert decoded.mode == "RGB" and decoded.size == (320, 240)
    if mode in ("L", "I;16", "I", "F"):  # 16-bit and float scaled into 8 bits, not clipped to white
        grey = np.asarray(base.convert("L"), dtype=np.int16)
        assert np.abs(np.asarray(decoded)[..., 0].astype(np.int16) - grey).max() <= 1


def test_transparent_pixels_go_on_white() -> None:
    image = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    decoded = decode(encode(image, "PNG"), 256, 10**8)
    assert np.asarray(decoded).min() == 255


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (300, 300), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = io.BytesIO()
    frames[0].save(data, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode(data.getvalue(), 256, 10**8)
    assert tuple(np.asarray(decoded)[0, 0]) == (255, 0, 0)


def test_jpeg_draft_mode_for_large_images() -> None:
    data = big_photo_jpeg()
    drafted = decode(data, 256, 10**8)
    # 4000x3000 at 1/8 would be 500x375 (shorter side 375 >= 256); 1/16 does not exist.
    assert drafted.size == (500, 375)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    a = center_square(drafted, 256).astype(np.int16)
    b = center_square(full, 256).astype(np.int16)
    assert np.abs(a - b).mean() < 1.0  # well under one grey level on average


def test_small_jpeg_not_drafted() -> None:
    assert decode(photo_jpeg(), 256, 10**8).size == (640, 427)


def test_preprocess_shapes_and_timings() -> None:
    result = preprocess(photo_jpeg(), resize=256, crop=224, mean=MEAN, std=STD, max_pixels=10**8)
    assert result.batch.shape == (10, 3, 224, 224) and result.decode_s > 0 and result.preprocess_s > 0


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"", 400, "empty"),
        (b"hello, this is text", 415, "not a supported image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', 415, "not a supported"),
        (photo_jpeg()[:2000], 422, "truncated"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 20, 422, "corrupt JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, 422, "corrupt PNG"),
    ],
)
def test_bad_bytes(data: bytes, status: int, words: str) -> None:
    with pytest.raises(ImageInputError) as info:
        decode(data, 256, 10**8)
    assert info.value.status_code == status and words in info.value.detail


def test_pixel_limit_checked_from_header() -> None:
    data = photo_jpeg()
    with pytest.raises(ImageInputError) as info:
        decode(data, 256, 640 * 427 - 1)
    assert info.value.status_code == 413 and "640x427" in info.value.detail
