"""Small image folders for the preprocessing tests: good images of each kind and bad files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def smooth_rgb(seed: int, h: int = 20, w: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-4, 4, size=(3, 2))
    img = base[None, None] + x[..., None] * slope[:, 0] + y[..., None] * slope[:, 1]
    return np.clip(img, 0, 255).astype(np.uint8)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` × ``height`` pixels."""
    good = png_bytes(np.zeros((1, 1), np.uint8))
    assert good[12:16] == b"IHDR"
    body = b"IHDR" + struct.pack(">II", width, height) + good[24:29]
    return good[:8] + good[8:12] + body + struct.pack(">I", zlib.crc32(body)) + good[33:]


BAD_FILES = {
    "corrupt.png": "not a decodable",
    "empty.png": "empty file",
    "notes.txt": "not an image file",
    "truncated.png": "corrupt or truncated",
    "sixteen.png": "unsupported mode",
    "bomb.png": "decompression bomb",
}


def bad_file_bytes() -> dict[str, bytes]:
    good = png_bytes(smooth_rgb(99, 64, 64))
    return {
        "corrupt.png": b"\x89PNG\r\n\x1a\nthis is not really a png at all" * 3,
        "empty.png": b"",
        "notes.txt": b"hello",
        "truncated.png": good[: len(good) // 2],
        "sixteen.png": png_bytes(np.full((4, 4), 40000, np.uint16)),
        "bomb.png": bomb_png(60_000, 60_000),
    }


def make_folder(root: Path, *, per_class: int = 6, unlabelled: int = 3, bad: bool = True,
                classes=("cat", "dog")) -> dict[str, bytes]:
    """An ImageFolder tree; returns {relative key: bytes} of every file written."""
    files: dict[str, bytes] = {}
    formats = [("png", "PNG", {}), ("jpg", "JPEG", {"quality": 95}), ("webp", "WEBP",
               {"lossless": True}), ("bmp", "BMP", {})]
    seed = 0
    for c in classes:
        for i in range(per_class):
            ext, fmt, kw = formats[i % len(formats)]
            img = Image.fromarray(smooth_rgb(seed))
            seed += 1
            files[f"{c}/img{i:03d}.{ext}"] = encode(img, fmt, **kw)
    for i in range(unlabelled):
        files[f"loose{i}.png"] = png_bytes(smooth_rgb(1000 + i))
    if bad:
        for name, data in bad_file_bytes().items():
            files[f"{classes[0]}/{name}"] = data
    files[".DS_Store"] = b"hidden, ignored"
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files
