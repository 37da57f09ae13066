"""Helpers shared by the pipeline tests (tests/tasks, tests/flows); no tests here.

Import them as ``from tests.helpers import ...`` (pyproject puts the repository root on the
path); a test module never imports another test module. The math tests (tests/diffusion) keep to
torch and their own oracle (tests/diffusion/oracle.py), as the package they test does.

- the CLI: :func:`invoke`, :func:`sets`, :data:`TINY_UNET` (the smallest UNet as ``--set`` items)
- tiny saved models and registry inputs: :func:`save_tiny_model`, :func:`evaluation`, ...
- processes and HTTP: :func:`free_port`, :func:`wait_http`, :func:`start`, :func:`stop`
- concurrency: :class:`Occupancy`, :func:`run_together`
- image files for preprocessing: :func:`make_folder`, :data:`BAD_FILES`, ...
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.denoiser import Denoiser, classifier_free_guidance
from diffusion.noise import SampleNoise
from diffusion.pipeline import DiffusionConfig
from diffusion.pixels import unit_to_uint8
from diffusion.samplers import SamplerConfig, sample
from diffusion.serialization import save_model
from diffusion.unet import UNet, UNetConfig

# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------

# The smallest UNet the pipeline trains, as `--set` items (tests add their train settings).
TINY_UNET = ["model.base_channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1",
             "model.attention_resolutions=[]"]


def sets(*items: str) -> list[str]:
    """``sets("a.b=1", "c.d=2")`` → ``["--set", "a.b=1", "--set", "c.d=2"]``."""
    return [a for s in items for a in ("--set", s)]


def invoke(args: list[str]):
    """CliRunner.invoke of the pipeline CLI, then point Prefect's console handlers back at the
    real stderr.

    Prefect creates its console handler on the stream that is sys.stderr when the flow engine
    sets up logging, here CliRunner's capture stream, which is closed when invoke returns.
    """
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, args)
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]:
        for h in getattr(logger, "handlers", []):
            if isinstance(h, PrefectConsoleHandler):
                h.stream = sys.__stderr__
                h.console.file = sys.__stderr__
    return result


# --------------------------------------------------------------------------------------------
# Tiny saved models and what the registry takes with them
# --------------------------------------------------------------------------------------------

UNET = UNetConfig(resolution=8, in_channels=1, base_channels=8, channel_mult=(1,),
                  num_res_blocks=1, attention_resolutions=(), num_classes=10)
DIFFUSION = DiffusionConfig(T=100).to_dict()  # what training writes
CLASS_NAMES = [str(i) for i in range(10)]
DEFAULTS = {"sampler": {"name": "ddim", "steps": 4}, "guidance_scale": 2.0}
_names = itertools.count()


def save_tiny_model(directory: Path, seed: int) -> Path:
    """A random tiny UNet saved as training saves ``model/`` (output scaled so it matters)."""
    torch.manual_seed(seed)
    model = UNet(UNET)
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    return save_model(directory, model.state_dict(),
                      {"unet": UNET.to_dict(), "diffusion": DIFFUSION, "class_names": CLASS_NAMES})


def local_images(model, config, rows) -> list:
    """Each (seed, label) row sampled alone with the diffusion package, as ``DEFAULTS`` say
    (DDIM 4 steps, guidance 2): the reference the pyfunc's images must equal."""
    out = []
    for seed, label in rows:
        labels = torch.tensor([UNET.num_classes if label is None else label])
        net = model if label is None else classifier_free_guidance(model, 2.0, UNET.num_classes)
        schedule = DiffusionConfig.from_dict(config["diffusion"]).build_schedule()
        den = Denoiser(net, schedule, "eps", labels=labels)
        x = sample(den, (1, 8, 8), SampleNoise(seed, [0]), SamplerConfig("ddim", steps=4))
        out.append(unit_to_uint8(x)[0].numpy())
    return out


def evaluation(fd: float, key: str = "a" * 16, **metrics) -> dict:
    return {"eval_key": key, "dataset": {"name": "digits", "version": "d" * 16},
            "metrics": {"fd": fd, "fd_floor": 1.0, "nll_bpd": 4.5, "nll_bpd_se": 0.05,
                        "memorization": 0.0, **metrics},
            "frontier": [{"sampler": "ddim", "steps": 10, "fd": fd + 1, "images_per_s": 300.0,
                          "nfe": 10}],
            "default_sampler": {"name": "ddim", "steps": 4}}


class ShiftedPaired:
    """``paired=`` for the promotion gate (:mod:`tasks.registry.gate`): every version's stored
    sample features are one fixed sample set moved along one feature by √fd, where
    ``fd(model_ref)`` gives the version's fd (None: it has no stored paired inputs). The paired
    FD difference of two versions is then about the difference of their fds, with the same
    noise in both, so the gate tells it at once. ``asked``: the model refs asked for."""

    def __init__(self, fd, n: int = 300, dim: int = 8):
        rng = np.random.default_rng(0)
        self.reference = rng.standard_normal((n, dim)).astype(np.float32)
        self.base = rng.standard_normal((n, dim)).astype(np.float32)
        self.fd, self.n, self.asked = fd, n, []

    def __call__(self, model_ref: str) -> dict | None:
        self.asked.append(model_ref)
        fd = self.fd(model_ref)
        if fd is None:
            return None
        x = self.base.copy()
        x[:, 0] += float(fd) ** 0.5
        return {"setting": "ddim:10", "arrays": {"samples/ddim:10": x,
                                                 "reference": self.reference},
                "samples": self.n, "seconds": 1.0}


def lineage(**extra) -> dict[str, str]:
    return {"config.sha256": "c" * 64, "checkpoint.uri": "/runs/r/checkpoint_000001", **extra}


def unique_name(prefix: str = "m") -> str:
    return f"{prefix}-{next(_names)}-diffusion"


# --------------------------------------------------------------------------------------------
# Processes and HTTP
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Poll ``url`` until it answers 200; fail with the process log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """A process in its own session, so the test can stop it and its workers together."""
    return subprocess.Popen(cmd, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})})


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of :func:`start`'s process; SIGKILL after 15 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------


class Occupancy:
    """How many threads are inside ``hold()`` at once: ``most`` is the peak, ``entries`` the
    count. A block that should be exclusive must show ``most == 1``."""

    def __init__(self):
        self._guard = threading.Lock()
        self._inside = self.most = self.entries = 0

    @contextlib.contextmanager
    def hold(self, seconds: float):
        with self._guard:
            self._inside += 1
            self.entries += 1
            self.most = max(self.most, self._inside)
        try:
            time.sleep(seconds)  # widens the window in which an unguarded block would overlap
            yield
        finally:
            with self._guard:
                self._inside -= 1


def run_together(fn, args: list) -> None:
    """``fn(a)`` for every ``a`` in ``args``, each on its own thread, all started at once."""
    threads = [threading.Thread(target=fn, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --------------------------------------------------------------------------------------------
# Image files for the preprocessing tests: good images of each kind and bad files
# --------------------------------------------------------------------------------------------


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
    "bomb.png": "decompression bomb",
    "bad-exif.png": "unreadable EXIF metadata",
}


def bad_file_bytes() -> dict[str, bytes]:
    good = png_bytes(smooth_rgb(99, 64, 64))
    return {
        "corrupt.png": b"\x89PNG\r\n\x1a\nthis is not really a png at all" * 3,
        "empty.png": b"",
        "notes.txt": b"hello",
        "truncated.png": good[: len(good) // 2],
        "bomb.png": bomb_png(60_000, 60_000),
        "bad-exif.png": bad_exif_png(),
    }


def bad_exif_png() -> bytes:
    """A 16x16 PNG whose eXIf chunk is garbage: Pillow's EXIF parser raises SyntaxError."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG", exif=b"NOTATIFFHEADER")
    return buf.getvalue()


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
