"""The logging window: running sums over one ``train.log_every`` interval of the loop, turned
into the metrics every rank reports (and rank 0 logs) at the interval's end."""

from __future__ import annotations

import time

import numpy as np


class Window:
    """Loss, gradient norm and per-quarter-of-t loss summed since the last :meth:`reset`."""

    def __init__(self, T: int):
        self.T = T
        self.reset()

    def reset(self) -> None:
        """Start a new interval (and its clock)."""
        self.loss, self.n, self.grad = 0.0, 0, 0.0
        self.q, self.qn = np.zeros(4), np.zeros(4)
        self.t0 = time.perf_counter()

    def add(self, out: dict) -> None:
        """Add one ``train_step`` result: its loss, gradient norm and per-sample losses, each
        counted in the quarter of 0..T-1 its sample's t falls in."""
        self.loss += out["loss"]
        self.grad += out["grad_norm"]
        self.n += 1
        q = (out["t"] * 4 // self.T).clamp_(0, 3).cpu().numpy()
        per = out["per_sample"].float().cpu().numpy()
        np.add.at(self.q, q, per)
        np.add.at(self.qn, q, 1)

    def metrics(self, done: int, *, steps: int, start: int, nodes: int, lr: float,
                batch_size: int, world_size: int = 1) -> dict:
        """The interval's means as reported after step ``done`` of ``steps`` (``batch_size``:
        the global batch, for images per second)."""
        dt = time.perf_counter() - self.t0
        n = max(self.n, 1)
        return {
            "step": done,
            "status": "running" if done < steps else "finished",
            "resumed_from": start,
            "nodes": nodes,
            "world_size": world_size,
            "loss": self.loss / n,
            "grad_norm": self.grad / n,
            "lr": lr,
            "images_per_s": self.n * batch_size / max(dt, 1e-9),
            **{f"loss_q{i + 1}": float(self.q[i] / self.qn[i])
               for i in range(4) if self.qn[i]},
        }
