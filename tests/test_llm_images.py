"""Images become PNG data URLs on Qwen2.5-VL's 28-pixel grid, within its pixel limits; an
unusable image is an InputError naming it."""

from __future__ import annotations

import base64
import gc
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from suwen.errors import InputError
from suwen.llm.images import FACTOR, ImageEncoder, fit_size, image_to_data_url, prepare_image

MIN_PIXELS = 3136
MAX_PIXELS = 1_003_520


def decode(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


@given(
    height=st.integers(1, 6000),
    width=st.integers(1, 6000),
    # From 256 visual tokens up to Qwen's own maximum.
    max_pixels=st.sampled_from([28 * 28 * 256, MAX_PIXELS, 12_845_056]),
)
# A ratio just under the limit that rounding to the grid would push over it (201:1).
@example(height=29, width=5615, max_pixels=MAX_PIXELS)
@example(height=5615, width=29, max_pixels=MAX_PIXELS)
def test_fit_size_is_on_the_grid_within_limits(height: int, width: int, max_pixels: int) -> None:
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            fit_size(height, width, MIN_PIXELS, max_pixels)
        return
    new_h, new_w = fit_size(height, width, MIN_PIXELS, max_pixels)
    assert new_h % FACTOR == 0 and new_w % FACTOR == 0
    assert MIN_PIXELS <= new_h * new_w <= max_pixels
    assert max(new_h, new_w) / min(new_h, new_w) <= 200
    # Idempotent: what is sent is exactly what the server's processor keeps as it is.
    assert fit_size(new_h, new_w, MIN_PIXELS, max_pixels) == (new_h, new_w)


def test_matches_qwens_own_resize() -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for height, width in [(1384, 2321), (512, 512), (37, 4000), (20, 20), (4000, 3000)]:
        expected = smart_resize(height, width, 28, MIN_PIXELS, MAX_PIXELS)
        assert fit_size(height, width, MIN_PIXELS, MAX_PIXELS) == tuple(expected)


def test_large_vqa_rad_scan_is_shrunk(shared_data: Path) -> None:
    path = shared_data / "vqa_rad" / "images" / "synpic100132.jpg"
    original = Image.open(path)
    assert original.width * original.height > MAX_PIXELS
    sent = decode(image_to_data_url(original, MIN_PIXELS, MAX_PIXELS))
    assert sent.format == "PNG"
    # The server reads it as RGB: exactly the pixels of the resized RGB image.
    expected = prepare_image(original, MIN_PIXELS, MAX_PIXELS)
    assert sent.convert("RGB").tobytes() == expected.tobytes()
    assert sent.width * sent.height <= MAX_PIXELS
    assert (sent.height, sent.width) == fit_size(
        original.height, original.width, MIN_PIXELS, MAX_PIXELS
    )


def test_small_greyscale_image_is_enlarged_and_sent_grey() -> None:
    grey = Image.new("L", (30, 20), color=128)
    sent = decode(image_to_data_url(grey, MIN_PIXELS, MAX_PIXELS))
    assert sent.mode == "L"
    assert sent.width * sent.height >= MIN_PIXELS
    assert sent.convert("RGB").getpixel((5, 5)) == (128, 128, 128)
    expected = prepare_image(grey, MIN_PIXELS, MAX_PIXELS)
    assert sent.convert("RGB").tobytes() == expected.tobytes()


def test_image_already_on_the_grid_is_sent_unchanged() -> None:
    image = Image.effect_noise((280, 196), 40).convert("RGB")
    sent = decode(image_to_data_url(image, MIN_PIXELS, MAX_PIXELS))
    assert sent.size == image.size
    assert sent.convert("RGB").tobytes() == image.tobytes()  # lossless


@pytest.mark.parametrize("size", [(280, 196), (300, 211)])  # on the grid, and resized
def test_a_colour_image_stays_rgb(size: tuple[int, int]) -> None:
    image = Image.merge("RGB", [Image.effect_noise(size, 40) for _ in range(3)])
    image.putpixel((0, 0), (10, 10, 10))
    sent = decode(image_to_data_url(image, MIN_PIXELS, MAX_PIXELS))
    assert sent.mode == "RGB"
    assert sent.tobytes() == prepare_image(image, MIN_PIXELS, MAX_PIXELS).tobytes()


def test_a_gradient_arrives_exact_and_deflated() -> None:
    # Neighbouring rows and columns differ by steps that wrap past 255: each row less the one
    # above it is taken modulo 256, as PNG decoders add it back.
    rows = np.add.outer(np.arange(252) * 7, np.arange(308) * 3) % 256
    image = Image.fromarray(rows.astype(np.uint8), "L")
    url = image_to_data_url(image, MIN_PIXELS, MAX_PIXELS)
    sent = decode(url)
    assert sent.mode == "L" and sent.tobytes() == image.tobytes()
    assert len(base64.b64decode(url.split(",", 1)[1])) < image.width * image.height // 10


def test_an_image_grey_but_for_one_pixel_stays_rgb() -> None:
    image = Image.effect_noise((280, 196), 40).convert("RGB")
    image.putpixel((100, 50), (200, 10, 10))
    sent = decode(image_to_data_url(image, MIN_PIXELS, MAX_PIXELS))
    assert sent.mode == "RGB" and sent.tobytes() == image.tobytes()


def test_truncated_file_is_an_input_error_naming_it(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "vqa_rad" / "images" / "synpic100132.jpg"
    broken = tmp_path / "broken.jpg"
    shutil.copy(source, broken)
    broken.write_bytes(broken.read_bytes()[:2000])
    image = Image.open(broken)  # PIL reads only the header here
    with pytest.raises(InputError, match=r"broken\.jpg"):
        prepare_image(image, MIN_PIXELS, MAX_PIXELS)


def test_extreme_aspect_ratio_is_an_input_error() -> None:
    with pytest.raises(InputError, match="aspect ratio"):
        prepare_image(Image.new("RGB", (5000, 10)), MIN_PIXELS, MAX_PIXELS)


def test_encoder_encodes_each_image_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_encodes(monkeypatch)
    encoder = ImageEncoder(MIN_PIXELS, MAX_PIXELS, capacity=2)
    first, second = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (56, 56), "blue")
    assert encoder.data_url(first) == encoder.data_url(first)
    assert encoder.data_url(second) != encoder.data_url(first)
    assert len(calls) == 2
    third = Image.new("RGB", (56, 56), "green")
    encoder.data_url(third)  # capacity 2: the least recently used (second) goes
    assert not encoder.cached(second) and encoder.cached(first) and encoder.cached(third)
    key = id(third)
    del third
    gc.collect()
    assert key not in encoder._urls  # a collected image's id may be reused: forgotten


def _counting_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from suwen.llm import images

    calls: list[int] = []
    real = images.image_to_data_url

    def counting(image: Image.Image, min_pixels: int, max_pixels: int) -> str:
        calls.append(id(image))
        return real(image, min_pixels, max_pixels)

    monkeypatch.setattr(images, "image_to_data_url", counting)
    return calls


def _two_halves(path: Path, left: str, right: str) -> None:
    image = Image.new("RGB", (56, 56), left)
    image.paste(Image.new("RGB", (28, 56), right), (28, 0))
    image.save(path)


def test_a_file_loaded_again_is_encoded_once_until_it_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import os

    from suwen.medimage import load_image

    calls = _counting_encodes(monkeypatch)
    encoder = ImageEncoder(MIN_PIXELS, MAX_PIXELS)
    case = tmp_path / "case.png"
    _two_halves(case, "red", "blue")
    first, again = load_image(case), load_image(case)  # as two questions load one case
    assert first is not again
    assert encoder.data_url(first) == encoder.data_url(again)
    assert len(calls) == 1 and encoder.cached(load_image(case))
    # An image made from a loaded one is not the file's image, whatever its info says.
    flipped = first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert decode(encoder.data_url(flipped)).convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert len(calls) == 2
    # The file rewritten (another size or modification time): encoded afresh, new pixels.
    stamp = case.stat().st_mtime_ns
    _two_halves(case, "green", "blue")
    os.utime(case, ns=(stamp + 10**9, stamp + 10**9))
    changed = load_image(case)
    assert not encoder.cached(changed)
    assert decode(encoder.data_url(changed)).convert("RGB").getpixel((0, 0)) == (0, 128, 0)
    assert len(calls) == 3


def test_the_file_cache_keeps_its_size_bound(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from suwen.medimage import load_image

    calls = _counting_encodes(monkeypatch)
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    _two_halves(one, "red", "blue")
    _two_halves(two, "white", "black")
    sizes = [len(image_to_data_url(load_image(p), MIN_PIXELS, MAX_PIXELS)) for p in (one, two)]
    room = max(sizes) + min(sizes) - 1  # either URL fits, both do not
    encoder = ImageEncoder(MIN_PIXELS, MAX_PIXELS, file_capacity=room)
    encoder.data_url(load_image(one))
    encoder.data_url(load_image(two))  # room for one URL: the file read first goes
    assert encoder.cached(load_image(two)) and not encoder.cached(load_image(one))
    assert encoder._file_chars <= encoder.file_capacity
    assert len(calls) == 2


def test_a_file_asked_for_at_once_by_two_questions_is_encoded_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import threading

    from suwen.llm import images
    from suwen.medimage import load_image

    started, release = threading.Event(), threading.Event()
    calls: list[int] = []
    real = images.image_to_data_url

    def slow(image: Image.Image, min_pixels: int, max_pixels: int) -> str:
        calls.append(id(image))
        started.set()
        release.wait(10)
        return real(image, min_pixels, max_pixels)

    monkeypatch.setattr(images, "image_to_data_url", slow)
    encoder = ImageEncoder(MIN_PIXELS, MAX_PIXELS)
    case = tmp_path / "case.png"
    _two_halves(case, "red", "blue")
    urls: list[str] = []
    first = threading.Thread(target=lambda: urls.append(encoder.data_url(load_image(case))))
    second = threading.Thread(target=lambda: urls.append(encoder.data_url(load_image(case))))
    first.start()
    assert started.wait(10)
    second.start()  # finds the file being encoded and waits for it
    second.join(0.2)
    assert second.is_alive() and len(calls) == 1
    release.set()
    first.join(10)
    second.join(10)
    assert len(calls) == 1 and len(urls) == 2 and urls[0] == urls[1]


def test_a_failed_encoding_lets_the_next_caller_try(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from suwen.llm import images
    from suwen.medimage import load_image

    real = images.image_to_data_url
    failures = [OSError("disk hiccup")]

    def flaky(image: Image.Image, min_pixels: int, max_pixels: int) -> str:
        if failures:
            raise failures.pop()
        return real(image, min_pixels, max_pixels)

    monkeypatch.setattr(images, "image_to_data_url", flaky)
    encoder = ImageEncoder(MIN_PIXELS, MAX_PIXELS)
    case = tmp_path / "case.png"
    _two_halves(case, "red", "blue")
    with pytest.raises(OSError, match="hiccup"):
        encoder.data_url(load_image(case))
    assert decode(encoder.data_url(load_image(case))).size == (56, 56)
