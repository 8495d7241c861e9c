"""A user's image, whatever its file, mode or array kind, reads as upright opaque uint8 RGB.

Every file is built here in a tmp folder (or ram://), so the cases say exactly
which bytes they feed in; bad files must fail as ImageError naming the file.
"""

import io
import pathlib
import struct
import time
import uuid
import warnings
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from unified_seq import images
from unified_seq.images import ImageError, image_name, load_image


def _save(img: Image.Image, path: pathlib.Path, **kwargs) -> str:
    img.save(path, **kwargs)
    return str(path)


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, [h, w, 3], dtype=np.uint8)


def _check_rgb(out: np.ndarray, h: int, w: int) -> None:
    assert out.dtype == np.uint8 and out.shape == (h, w, 3)
    assert out.flags.c_contiguous and out.flags.writeable


# --- files: formats and modes ---------------------------------------------------------------


def test_png_round_trip_is_exact(tmp_path):
    pixels = _noise(7, 11)
    out = load_image(_save(Image.fromarray(pixels), tmp_path / "a.png"))
    _check_rgb(out, 7, 11)
    np.testing.assert_array_equal(out, pixels)


def test_jpeg_round_trip_is_close(tmp_path):
    # Flat 8x8-aligned blocks, colour not subsampled, survive JPEG almost unchanged.
    pixels = np.kron(_noise(4, 6), np.ones([8, 8, 1], np.uint8))
    path = _save(Image.fromarray(pixels), tmp_path / "a.jpg", quality=95, subsampling=0)
    out = load_image(path)
    _check_rgb(out, 32, 48)
    assert np.abs(out.astype(int) - pixels).mean() < 3.0


def test_path_objects_are_accepted(tmp_path):
    pixels = _noise(3, 4)
    path = pathlib.Path(_save(Image.fromarray(pixels), tmp_path / "p.png"))
    np.testing.assert_array_equal(load_image(path), pixels)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    grey = np.array([[0, 50], [128, 255]], np.uint8)
    out = load_image(_save(Image.fromarray(grey, "L"), tmp_path / "g.png"))
    _check_rgb(out, 2, 2)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=-1))


def test_one_bit_becomes_black_and_white(tmp_path):
    img = Image.new("1", (3, 1), 0)
    img.putpixel((1, 0), 1)
    out = load_image(_save(img, tmp_path / "bw.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros([2, 3, 4], np.uint8)
    rgba[:, 0] = [10, 20, 30, 0]  # fully transparent: its stored colour must not show
    rgba[:, 1] = [200, 0, 0, 255]  # opaque: keeps its colour
    rgba[:, 2] = [0, 0, 0, 128]  # half black over white: (255 * 127 + 127) // 255
    out = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "t.png"))
    _check_rgb(out, 2, 3)
    np.testing.assert_array_equal(out[:, 0], [[255, 255, 255]] * 2)
    np.testing.assert_array_equal(out[:, 1], [[200, 0, 0]] * 2)
    np.testing.assert_array_equal(out[:, 2], [[127, 127, 127]] * 2)


def test_grey_with_alpha_is_composited_over_white(tmp_path):
    la = Image.fromarray(np.array([[[40, 0], [40, 255]]], np.uint8), "LA")
    out = load_image(_save(la, tmp_path / "la.png"))
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [40, 40, 40]])


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_transparency_is_white(tmp_path, suffix):
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    out = load_image(_save(img, tmp_path / f"p.{suffix}", transparency=0))
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [0, 255, 0], [0, 0, 255]])


def test_sixteen_bit_png_is_scaled_by_257_not_clipped(tmp_path):
    values = np.array([[0, 257, 32767, 32768, 60000, 65535]], np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as img:
        assert img.mode == "I;16"  # the mode this test is about
    out = load_image(path)
    _check_rgb(out, 1, 6)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 127, 128, 233, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan or black: red
    out = load_image(_save(cmyk, tmp_path / "c.jpg", quality=95))
    _check_rgb(out, 16, 16)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide, 20 high, red at the stored top-left; orientation 6 means the
    # camera was turned: shown rotated 90 degrees clockwise, the red corner is top-right.
    pixels = np.full([20, 40, 3], 128, np.uint8)
    pixels[:8, :8] = [255, 0, 0]
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(_save(Image.fromarray(pixels), tmp_path / "phone.jpg", exif=exif))
    _check_rgb(out, 40, 20)
    assert out[2, 17, 0] > 200 and out[2, 17, 1] < 60  # top-right: red
    assert abs(int(out[2, 2, 0]) - 128) < 10  # top-left: grey
    assert abs(int(out[37, 17, 0]) - 128) < 10  # bottom-right: grey


@pytest.mark.parametrize("suffix", ["gif", "png", "tiff"])
def test_animated_or_multi_frame_gives_the_first_frame(tmp_path, suffix):
    first = Image.new("RGB", (4, 3), (255, 0, 0))
    second = Image.new("RGB", (4, 3), (0, 0, 255))
    path = _save(first, tmp_path / f"anim.{suffix}", save_all=True, append_images=[second])
    with Image.open(path) as img:
        assert img.n_frames == 2
    out = load_image(path)
    _check_rgb(out, 3, 4)
    np.testing.assert_array_equal(out[1, 1], [255, 0, 0])


def test_ram_filesystem_path(tmp_path):
    pixels = _noise(5, 6, seed=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path = f"ram://test_images/{uuid.uuid4().hex}/x.png"
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
    np.testing.assert_array_equal(load_image(path), pixels)
    with pytest.raises(ImageError, match="missing.png: no such file"):
        load_image(path.replace("x.png", "missing.png"))


# --- files that must be refused --------------------------------------------------------


def test_truncated_jpeg_is_refused_by_name(tmp_path):
    path = tmp_path / "cut.jpg"
    _save(Image.fromarray(_noise(64, 64)), path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated image data"):
        load_image(str(path))


def test_truncated_png_is_refused_by_name(tmp_path):
    path = tmp_path / "cut.png"
    _save(Image.fromarray(_noise(64, 64)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: corrupt or truncated"):
        load_image(str(path))


def test_random_bytes_are_not_an_image(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ImageError, match=r"noise\.jpg: not an image"):
        load_image(str(path))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png: no such file"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(ImageError, match="cannot be read"):
        load_image(str(tmp_path))


def test_eps_is_refused_not_handed_to_ghostscript(tmp_path):
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "EPS"  # PIL would take it, and load() would run Ghostscript
    path = tmp_path / "doc.eps"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=r"doc\.eps: not an image .*refused: EPS"):
        load_image(str(path))


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says width x height (CRC fixed, so only the size lies)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # 8-byte signature, then the IHDR chunk: length (4), type (4), data (13), CRC (4).
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(50_000, 50_000))
    limit_before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"bomb\.png: refused as a decompression bomb"):
        load_image(str(path))
    assert time.perf_counter() - start < 1.0  # 7.5 GB of RGB was never allocated
    assert limit_before == Image.MAX_IMAGE_PIXELS
    # Refused for its size alone: with PIL's check off, the header reads as a valid PNG.
    # And a caller who switched PIL's check off still gets ours.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(path) as img:
        assert (img.format, img.size) == ("PNG", (50_000, 50_000))
    with pytest.raises(ImageError, match=r"bomb\.png: refused as a decompression bomb"):
        load_image(str(path))
    assert Image.MAX_IMAGE_PIXELS is None


def test_pixel_limit_is_exact_and_pil_settings_are_restored(tmp_path):
    # A real, tiny file (one colour compresses to ~2 KB) of 2 million pixels.
    path = _save(Image.new("RGB", (2000, 1000), (9, 8, 7)), tmp_path / "wide.png")
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters_before = list(warnings.filters)
        with pytest.raises(ImageError, match=r"wide\.png: .*2000000 pixels"):
            load_image(path, max_pixels=1_999_999)
        out = load_image(path, max_pixels=2_000_000)
        assert warnings.filters == filters_before
    assert [w.message for w in caught] == []  # refused, not warned about
    assert limit_before == Image.MAX_IMAGE_PIXELS
    _check_rgb(out, 1000, 2000)
    np.testing.assert_array_equal(out[500, 1000], [9, 8, 7])


def test_default_limit_admits_a_200_megapixel_phone_photo():
    assert 16_320 * 12_240 <= images.MAX_PIXELS < 2 * 16_384 * 16_384


def test_lazy_pil_image_is_size_checked_before_loading(tmp_path):
    path = _save(Image.new("RGB", (300, 200)), tmp_path / "lazy.png")
    too_many = r"lazy\.png: 300 x 200 = 60000 pixels is more than max_pixels=1000"
    with Image.open(path) as img, pytest.raises(ImageError, match=too_many):
        load_image(img, max_pixels=1000)


# --- PIL images ------------------------------------------------------------------------


def test_pil_rgb_image_is_not_modified(tmp_path):
    pixels = _noise(4, 5, seed=2)
    img = Image.fromarray(pixels)
    out = load_image(img)
    np.testing.assert_array_equal(out, pixels)
    out[:] = 0
    np.testing.assert_array_equal(np.asarray(img), pixels)


def test_pil_exif_orientation_is_applied_once():
    img = Image.new("RGB", (6, 2))
    img.getexif()[0x0112] = 6
    out = load_image(img)
    assert out.shape == (6, 2, 3)
    assert load_image(Image.fromarray(out)).shape == (6, 2, 3)


@pytest.mark.parametrize(
    "mode, raw, expected",
    [
        ("I;16B", np.array([[0, 32768, 65535]], ">u2"), [0, 128, 255]),
        ("I", np.array([[0, 100, 255]], np.int32), [0, 100, 255]),  # 8-bit range: kept
        ("I", np.array([[0, 32768, 65535]], np.int32), [0, 128, 255]),  # 16-bit range: / 257
        ("I", np.array([[-10, 0, 10]], np.int32), [0, 128, 255]),  # signed: stretched
        ("F", np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # [0, 1]
        ("F", np.array([[0.0, 127.6, 255.0]], np.float32), [0, 128, 255]),  # [0, 255]
        ("F", np.array([[-1.0, 0.0, 3.0]], np.float32), [0, 64, 255]),  # stretched
    ],
)
def test_pil_deep_grey_modes_scale_by_their_range(mode, raw, expected):
    img = Image.frombytes(mode, (3, 1), raw.tobytes())
    assert img.mode == mode
    out = load_image(img)
    _check_rgb(out, 1, 3)
    np.testing.assert_array_equal(out[0], np.repeat(np.array(expected)[:, None], 3, axis=1))


def test_pil_float_image_with_nan_is_refused():
    img = Image.frombytes("F", (2, 1), np.array([0.5, np.nan], np.float32).tobytes())
    with pytest.raises(ImageError, match="scan.tif: mode F image has NaN"):
        load_image(img, name="scan.tif")


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("CMYK", (0, 255, 255, 0), [255, 0, 0]),
        ("YCbCr", (255, 128, 128), [255, 255, 255]),
        ("P", 0, [0, 0, 0]),  # default palette entry 0 is black
        ("RGBX", (1, 2, 3, 0), [1, 2, 3]),
        ("PA", (0, 0), [255, 255, 255]),  # alpha 0: white
        ("RGBa", (0, 0, 0, 0), [255, 255, 255]),
        ("La", (0, 0), [255, 255, 255]),
    ],
)
def test_pil_other_modes(mode, colour, expected):
    out = load_image(Image.new(mode, (2, 2), colour))
    _check_rgb(out, 2, 2)
    np.testing.assert_array_equal(out[1, 1], expected)


# --- arrays ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.array([[7]], np.uint8), [7, 7, 7]),
        (np.array([[[7]]], np.uint8), [7, 7, 7]),
        (np.array([[[1, 2, 3]]], np.uint8), [1, 2, 3]),
        (np.array([[[1, 2, 3, 255]]], np.uint8), [1, 2, 3]),
        (np.array([[[1, 2, 3, 0]]], np.uint8), [255, 255, 255]),
        (np.array([[[0, 255, 0, 128]]], np.uint8), [127, 255, 127]),
        (np.array([[[0, 32768, 65535]]], np.uint16), [0, 128, 255]),
        (np.array([[[0, 0, 65535, 0]]], np.uint16), [255, 255, 255]),
        (np.array([[[-0.5, 0.5, 1.5]]], np.float32), [0, 128, 255]),
        (np.array([[0.2]], np.float64), [51, 51, 51]),
        (np.array([[[0.0, 1.0, 0.0, 1.0]]], np.float16), [0, 255, 0]),
    ],
)
def test_accepted_arrays(array, expected):
    out = load_image(array)
    _check_rgb(out, 1, 1)
    np.testing.assert_array_equal(out[0, 0], expected)


def test_array_result_is_a_contiguous_copy():
    pixels = _noise(4, 6, seed=3)
    flipped = pixels[:, ::-1]  # a strided view
    out = load_image(flipped)
    _check_rgb(out, 4, 6)
    np.testing.assert_array_equal(out, flipped)
    out[:] = 0
    assert pixels.any()
    same = load_image(pixels)
    assert not np.shares_memory(same, pixels)


def test_tensor_is_accepted_as_array():
    out = load_image(tf.constant([[[0.0, 0.5, 1.0]]]))
    np.testing.assert_array_equal(out[0, 0], [0, 128, 255])


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros([5], np.uint8), r"array: uint8\[5\] is not an image"),
        (np.zeros([2, 2, 5], np.uint8), r"uint8\[2, 2, 5\] is not an image"),
        (np.zeros([1, 2, 2, 3], np.uint8), r"uint8\[1, 2, 2, 3\] is not an image"),
        (np.zeros([0, 4, 3], np.uint8), r"uint8\[0, 4, 3\]: the image has no pixels \(4 x 0\)"),
        (np.zeros([4, 0], np.float32), r"float32\[4, 0\]: the image has no pixels"),
        (np.array([[0.1, np.nan, np.nan]]), r"float64\[1, 3\] has 2 NaN and 0 infinite"),
        (np.array([[0.1, np.inf]], np.float32), r"float32\[1, 2\] has 0 NaN and 1 infinite"),
        (np.zeros([2, 2], np.int64), r"int64\[2, 2\]: dtype must be uint8, uint16 or float"),
        (np.zeros([2, 2, 3], bool), r"bool\[2, 2, 3\]: dtype must be"),
        (np.array(3.0), r"float64\[\] is not an image"),
    ],
)
def test_refused_arrays(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_array_pixel_limit_and_name():
    with pytest.raises(ImageError, match=r"frame_7: uint8\[10, 20, 3\]: 20 x 10 = 200 pixels"):
        load_image(np.zeros([10, 20, 3], np.uint8), name="frame_7", max_pixels=199)
    assert load_image(np.zeros([10, 20, 3], np.uint8), max_pixels=200).shape == (10, 20, 3)


def test_other_objects_are_refused():
    with pytest.raises(ImageError, match=r"array: object\[\] is not an image"):
        load_image({"not": "an image"})


# --- names -----------------------------------------------------------------------------


def test_image_name(tmp_path):
    assert image_name("/data/photos/cat.jpg", 0) == "cat.jpg"
    assert image_name("gs://bucket/dir/dog.PNG", 3) == "dog.PNG"
    assert image_name("ram://x/y.webp", 1) == "y.webp"
    assert image_name(pathlib.Path("rel/a.tif"), 2) == "a.tif"
    assert image_name("gs://bucket/dir/", 4) == "image_4"
    assert image_name(np.zeros([2, 2, 3], np.uint8), 5) == "image_5"
    assert image_name(Image.new("RGB", (2, 2)), 6) == "image_6"
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "opened.png")
    with Image.open(path) as img:
        assert image_name(img, 7) == "opened.png"
    with Image.open(io.BytesIO(pathlib.Path(path).read_bytes())) as img:
        assert image_name(img, 8) == "image_8"
