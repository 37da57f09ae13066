"""Tiny models and evaluation dicts for the registry and serving tests."""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import torch

from diffusion.denoiser import Denoiser, classifier_free_guidance
from diffusion.noise import SampleNoise
from diffusion.pipeline import DiffusionConfig
from diffusion.pixels import unit_to_uint8
from diffusion.samplers import SamplerConfig, sample
from diffusion.serialization import save_model
from diffusion.unet import UNet, UNetConfig

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


def lineage(**extra) -> dict[str, str]:
    return {"config.sha256": "c" * 64, "checkpoint.uri": "/runs/r/checkpoint_000001", **extra}


def unique_name(prefix: str = "m") -> str:
    return f"{prefix}-{next(_names)}-diffusion"


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
