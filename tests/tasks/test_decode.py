"""decode_image: the per-input transform (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.decode import SkipInput, decode_image
from tests.helpers import BAD_FILES, bad_file_bytes, bomb_png, encode, png_bytes, smooth_rgb


def test_rgb_to_target_shape_and_mode():
    data = png_bytes(smooth_rgb(0, 40, 60))
    out = decode_image(data, resolution=16, mode="RGB", max_pixels=10**6)
    assert out.dtype == np.uint8 and out.shape == (3, 16, 16)
    gray = decode_image(data, resolution=16, mode="L", max_pixels=10**6)
    assert gray.shape == (1, 16, 16)


def test_center_crop_keeps_the_middle():
    # a white band (columns 20-69) inside black: the centre 30×30 crop (columns 30-59) is white
    arr = np.zeros((30, 90), np.uint8)
    arr[:, 20:70] = 255
    out = decode_image(png_bytes(arr), resolution=10, mode="L", max_pixels=10**6)
    assert out.min() >= 250


def test_same_size_is_lossless_and_layout_is_chw():
    arr = smooth_rgb(3, 8, 8)
    out = decode_image(png_bytes(arr), resolution=8, mode="RGB", max_pixels=10**6)
    np.testing.assert_array_equal(out, arr.transpose(2, 0, 1))


def test_alpha_is_composited_over_white():
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    out = decode_image(png_bytes(rgba), resolution=8, mode="RGB", max_pixels=10**6)
    assert (out == 255).all()


def test_exif_orientation_is_applied():
    arr = np.zeros((10, 20, 3), np.uint8)  # wide image, left half white
    arr[:, :10] = 255
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    data = encode(img, "JPEG", quality=100, exif=exif.tobytes())
    out = decode_image(data, resolution=10, mode="L", max_pixels=10**6)
    # displayed upright the image is tall with the white half on top; the centre crop shows it
    assert out[0, :3].mean() > 200 and out[0, -3:].mean() < 50


def test_formats_jpeg_webp_bmp_palette_cmyk():
    img = Image.fromarray(smooth_rgb(5, 12, 12))
    for data in (encode(img, "JPEG"), encode(img, "WEBP"), encode(img, "BMP"),
                 encode(img.convert("P"), "PNG"), encode(img.convert("CMYK"), "JPEG")):
        assert decode_image(data, resolution=8, mode="RGB", max_pixels=10**6).shape == (3, 8, 8)


def test_real_world_modes_convert_to_the_right_pixel_values():
    """CMYK JPEG, a palette with a transparent index, grey with alpha, 16-bit greyscale and an
    animated WebP (its first frame), checked by pixel value."""
    def rgb(data, mode="RGB"):
        return decode_image(data, resolution=16, mode=mode, max_pixels=10**6)

    solid = Image.new("RGB", (16, 16), (200, 40, 90))
    assert rgb(encode(solid.convert("CMYK"), "JPEG", quality=95))[:, 8, 8].tolist() == \
        [200, 40, 90]

    pal = Image.new("P", (16, 16), 0)  # index 0 transparent, index 1 opaque orange
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.paste(1, (0, 0, 8, 16))
    pal.info["transparency"] = 0
    out = rgb(encode(pal, "PNG"))
    assert out[:, 8, 2].tolist() == [200, 100, 50] and out[:, 8, 12].tolist() == [255] * 3

    la = np.dstack([np.full((16, 16), 100, np.uint8), np.full((16, 16), 128, np.uint8)])
    over_white = round(100 * 128 / 255 + 255 * (1 - 128 / 255))
    assert rgb(encode(Image.fromarray(la, "LA"), "PNG"), "L")[0, 8, 8] == over_white

    # 16-bit greyscale: rescaled (v / 257, rounded), not clipped at 255 as Pillow's "L" does
    sixteen = np.array([[0, 257, 40000, 65535]] * 4, np.uint16)
    out = decode_image(png_bytes(sixteen), resolution=4, mode="L", max_pixels=10**6)
    assert out[0, 0].tolist() == [0, 1, 156, 255]
    assert decode_image(png_bytes(sixteen), resolution=4, mode="RGB",
                        max_pixels=10**6)[:, 0, 2].tolist() == [156] * 3

    frames = [Image.new("RGB", (16, 16), (10 + 60 * i, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert rgb(buf.getvalue())[:, 8, 8].tolist() == [10, 0, 0]  # the first frame


@pytest.mark.parametrize("name", sorted(set(BAD_FILES) - {"notes.txt"}))
def test_bad_inputs_are_refused_with_a_reason(name):
    data = bad_file_bytes()[name]
    with pytest.raises(SkipInput, match=BAD_FILES[name].split()[0]) as e:
        decode_image(data, resolution=8, mode="RGB", max_pixels=10**6)
    assert BAD_FILES[name] in str(e.value)


def test_non_image_bytes_with_image_extension():
    with pytest.raises(SkipInput, match="not a decodable"):
        decode_image(b"hello", resolution=8, mode="RGB", max_pixels=10**6)


def test_gif_and_tiff_are_not_accepted_formats():
    img = Image.fromarray(smooth_rgb(1, 8, 8))
    for fmt in ("GIF", "TIFF"):
        with pytest.raises(SkipInput, match="not a decodable"):
            decode_image(encode(img, fmt), resolution=8, mode="RGB", max_pixels=10**6)


def test_decompression_bomb_refused_without_allocating():
    import tracemalloc

    # Under Pillow's own limit but over ours: refused by the declared size alone, before any
    # pixel buffer exists (a real decode of 9000×9000 RGB would need ~240 MB).
    data = bomb_png(9000, 9000)
    tracemalloc.start()
    with pytest.raises(SkipInput, match="declares 9000x9000"):
        decode_image(data, resolution=8, mode="RGB", max_pixels=10**6)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 * 2**20  # no pixel buffer was allocated
    # Far beyond Pillow's limit: Pillow refuses at open
    with pytest.raises(SkipInput, match="decompression bomb"):
        decode_image(bomb_png(100_000, 100_000), resolution=8, mode="RGB", max_pixels=10**12)


def test_large_jpeg_uses_draft_decoding():
    big = Image.fromarray(np.tile(smooth_rgb(2, 64, 64), (16, 16, 1)))  # 1024×1024
    data = encode(big, "JPEG", quality=90)
    out = decode_image(data, resolution=32, mode="RGB", max_pixels=10**7)
    ref = np.asarray(big.resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert out.shape == (3, 32, 32)
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 12


def test_reads_from_bytes_io_only():
    # decode_image takes bytes, never a path: nothing in the input can name a file to open
    with pytest.raises(SkipInput):
        decode_image(b"/etc/passwd", resolution=8, mode="L", max_pixels=10**6)
    assert isinstance(io.BytesIO(b"x"), io.BytesIO)


def test_any_failure_decoding_one_file_skips_that_file_only(tmp_path, monkeypatch):
    """decode_batch, the per-file guard: whatever one file's decoding raises (here a bug-like
    RuntimeError from inside Pillow) is that file's skip reason; the batch goes on."""
    import pyarrow as pa

    import tasks.decode
    from tasks.decode import decode_batch

    names = ["a.png", "boom.png", "bad-exif.png"]
    boom = np.full((8, 8, 3), 7, np.uint8)  # the one image the patched step fails on
    for name, data in zip(names, [png_bytes(smooth_rgb(1, 8, 8)), png_bytes(boom),
                                  bad_file_bytes()["bad-exif.png"]], strict=True):
        (tmp_path / name).write_bytes(data)
    real = tasks.decode._to_array

    def flaky(img, **kw):
        if (np.asarray(img) == 7).all():
            raise RuntimeError("pillow internals")
        return real(img, **kw)

    monkeypatch.setattr(tasks.decode, "_to_array", flaky)
    units = pa.Table.from_pylist([{"path": str(tmp_path / n), "key": n, "label": 0}
                                  for n in names])
    out = decode_batch(units, resolution=8, channels=3, max_pixels=10**6, val_fraction=0.0,
                       image_column="image", label_column=None, key_column=None,
                       source=str(tmp_path), options={}).to_pylist()
    errors = {r["key"]: r["error"] for r in out}
    assert errors["a.png"] is None and out[0]["pixels"] is not None
    assert errors["boom.png"] == "could not convert the image: RuntimeError: pillow internals"
    assert errors["bad-exif.png"].startswith("unreadable EXIF metadata: SyntaxError")


def test_a_batch_holds_at_most_fetch_bytes_of_files_and_skips_files_over_the_cap(tmp_path):
    """Ten 1 MiB files in one batch: fetched in groups of fetch_bytes, the task's peak memory is
    about one group, not the batch. A file that grew past max_file_bytes after the listing
    (the listing's size is what the driver checked) is skipped when read, not decoded."""
    import tracemalloc

    import pyarrow as pa

    from tasks.decode import decode_batch

    rng = np.random.default_rng(0)
    units = []
    for i in range(10):
        p = tmp_path / f"f{i}.png"
        p.write_bytes(rng.bytes(2**20))  # not an image: skipped after reading
        units.append({"path": str(p), "key": p.name, "label": 0, "size": 2**20})
    grown = tmp_path / "grown.png"
    grown.write_bytes(rng.bytes(3 * 2**20))  # over the cap of 2 MiB below
    units.append({"path": str(grown), "key": "grown.png", "label": 0, "size": 10})

    def peak(fetch_bytes: int) -> tuple[int, list[dict]]:
        tracemalloc.start()
        out = decode_batch(pa.Table.from_pylist(units), resolution=8, channels=1,
                           max_pixels=10**6, val_fraction=0.0, image_column="image",
                           label_column=None, key_column=None, source=str(tmp_path),
                           options={}, max_file_bytes=2 * 2**20,
                           fetch_bytes=fetch_bytes).to_pylist()
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top, out

    whole, _ = peak(2**40)
    grouped, out = peak(2 * 2**20)
    assert whole > 10 * 2**20 and grouped < 6 * 2**20, (whole, grouped)
    reasons = {r["key"]: r["error"] for r in out}
    assert reasons["grown.png"] == ("over data.max_file_bytes=2097152 when read (it grew after "
                                    "the listing)")
    assert reasons["f0.png"].startswith("not a decodable")
    assert all(r["pixels"] is None for r in out)


def test_groups_keep_order_and_fit_the_budget():
    from tasks.decode import _groups

    units = [{"size": s} for s in (5, 5, 3, 20, 1, 1)]
    assert [[u["size"] for u in g] for g in _groups(units, 10)] == [[5, 5], [3], [20], [1, 1]]
