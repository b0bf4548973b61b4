"""load_image_file: formats, EXIF orientation, bomb limit and every failure mode."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from preprocessing import ImageLoadError, load_image_file

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def _left_red_right_blue(width: int = 40, height: int = 20) -> Image.Image:
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 2, height))
    return img


def _save_with_orientation(img: Image.Image, path: Path, orientation: int | None) -> None:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())


def _is(pixel: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool(np.abs(pixel.astype(int) - np.array(colour)).max() < 40)


def test_jpeg_without_orientation_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    _save_with_orientation(_left_red_right_blue(), path, None)
    array = load_image_file(path)
    assert array.shape == (20, 40, 3) and array.dtype == np.uint8
    assert _is(array[10, 2], RED) and _is(array[10, 37], BLUE)


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    # Orientation 6: the stored image must be rotated 90 degrees clockwise for display,
    # so the stored left (red) half ends up at the top.
    path = tmp_path / "rotated.jpg"
    _save_with_orientation(_left_red_right_blue(), path, 6)
    array = load_image_file(path)
    assert array.shape == (40, 20, 3)
    assert _is(array[2, 10], RED) and _is(array[37, 10], BLUE)


def test_exif_orientation_3_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "upside_down.jpg"
    _save_with_orientation(_left_red_right_blue(), path, 3)
    array = load_image_file(path)
    assert array.shape == (20, 40, 3)
    assert _is(array[10, 2], BLUE) and _is(array[10, 37], RED)


def test_png_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    path = tmp_path / "noise.png"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(load_image_file(path), pixels)
    assert load_image_file(str(path)).shape == (17, 23, 3)  # str paths too


@pytest.mark.parametrize(
    "mode, value",
    [("L", 77), ("LA", (77, 128)), ("RGBA", (10, 20, 30, 0)), ("P", 5), ("I;16", 77 * 257), ("1", 1)],
)
def test_modes_convert_to_rgb(tmp_path: Path, mode: str, value: object) -> None:
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    Image.new(mode, (8, 6), value).save(path)
    array = load_image_file(path)
    assert array.shape == (6, 8, 3) and array.dtype == np.uint8
    if mode in ("L", "LA", "I;16"):
        assert (array == 77).all()
    if mode == "RGBA":
        assert tuple(array[0, 0]) == (10, 20, 30)  # alpha dropped, colour kept
    if mode == "1":
        assert (array == 255).all()


def test_cmyk_jpeg_converts_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    array = load_image_file(path)
    assert array.shape == (8, 8, 3)
    assert _is(array[4, 4], RED)


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 8000x8000 1-bit PNG is a few kB on disk but 64 Mpx decoded.
    path = tmp_path / "bomb.png"
    Image.new("1", (8000, 8000), 0).save(path, optimize=True)
    assert path.stat().st_size < 200_000

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("image data was decoded before the pixel limit was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError) as info:
        load_image_file(path)
    message = str(info.value)
    assert str(path) in message and "64000000" in message and "40000000" in message


def test_pixel_limit_argument(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(path)
    assert load_image_file(path, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageLoadError, match="max_pixels"):
        load_image_file(path, max_pixels=9_999)


def test_truncated_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, quality=90)
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert load_image_file(full).shape == (64, 64, 3)
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image_file(cut)
    assert str(cut) in str(info.value)


def test_truncated_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    full = tmp_path / "full.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:3000])
    with pytest.raises(ImageLoadError, match=str(cut).replace(".", r"\.")):
        load_image_file(cut)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match="not a recognised image format") as info:
        load_image_file(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageLoadError, match="empty"):
        load_image_file(path)


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match="no such file") as info:
        load_image_file(path)
    assert str(path) in str(info.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="directory"):
        load_image_file(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    with pytest.raises(ImageLoadError, match="permission"):
        load_image_file(path)


def test_lfw_image(lfw10: Path) -> None:
    array = load_image_file(lfw10 / "George_W_Bush" / "George_W_Bush_0001.jpg")
    assert array.shape == (250, 250, 3) and array.dtype == np.uint8 and array.flags["C_CONTIGUOUS"]
