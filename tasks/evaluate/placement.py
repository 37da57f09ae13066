"""Where an evaluation runs: in the calling process (the flow run), or as one Ray task asking
for ``evaluate.ray_gpus``/``ray_cpus``, after a stored result is looked up here. A Ray worker
imports this module for :func:`_evaluate_on_worker`; Ray itself is imported only when a task is
started."""

from __future__ import annotations

from tasks.datasets import DataConfig
from tasks.evaluate.config import EvalConfig
from tasks.evaluate.run import evaluate
from tasks.runtime import RuntimeConfig


def run_evaluation(model_ref: str, data: DataConfig, cfg: EvalConfig, runtime: RuntimeConfig,
                   *, dataset_version: str | None = None, echo=print) -> dict:
    """:func:`evaluate`, where ``evaluate.on_ray`` puts it.

    Off Ray (the default) it runs in this process. On Ray it is one task asking for
    ``ray_gpus``/``ray_cpus``, so a flow run on a CPU-only pod evaluates on a GPU node; its
    progress lines reach this process through Ray's worker-log forwarding. A stored result is
    looked up here first, on the CPU, so an unchanged rerun neither starts nor joins Ray."""
    if not cfg.on_ray:
        return evaluate(model_ref, data, cfg, runtime, dataset_version=dataset_version,
                        echo=echo)
    found = evaluate(model_ref, data, cfg.model_copy(update={"device": "cpu"}), runtime,
                     dataset_version=dataset_version, echo=echo, stored_only=True)
    if found is not None:
        return found
    import ray

    from tasks.runtime import ensure_ray

    ensure_ray(runtime, echo=echo)
    echo(f"evaluating {model_ref} as a Ray task ({cfg.ray_cpus:g} CPU"
         + (f", {cfg.ray_gpus:g} GPU" if cfg.ray_gpus else "") + ")")
    remote = ray.remote(num_cpus=cfg.ray_cpus, num_gpus=cfg.ray_gpus,
                        max_retries=0)(_evaluate_on_worker)  # retried as a whole by the task
    try:
        return ray.get(remote.remote(model_ref, data, cfg, runtime, dataset_version))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):  # EvalError & co., as if raised here (the retry
            raise e.cause from None         # policy and the one-line CLI errors see them)
        raise


def stored_evaluation(args: dict, *, echo=print) -> dict | None:
    """The stored result of the evaluation ``args`` describe (``model_ref``, ``config`` as
    JSON, ``dataset_version``), looked up on the CPU, or None: what a Ray Jobs driver checks
    before it submits one."""
    c = args["config"]
    cfg = EvalConfig(**c.get("evaluate", {}))
    return evaluate(args["model_ref"], DataConfig(**c["data"]),
                    cfg.model_copy(update={"device": "cpu"}), RuntimeConfig(**c["runtime"]),
                    dataset_version=args.get("dataset_version"), echo=echo, stored_only=True)


def _evaluate_on_worker(model_ref: str, data: DataConfig, cfg: EvalConfig,
                        runtime: RuntimeConfig, dataset_version: str | None) -> dict:
    """The Ray task's body: :func:`evaluate` on the task's CPUs, its progress lines tagged."""
    import torch

    torch.set_num_threads(max(1, int(cfg.ray_cpus)))  # the task's CPUs, in a reused worker too
    return evaluate(model_ref, data, cfg, runtime, dataset_version=dataset_version,
                    echo=lambda m: print(f"[evaluate] {m}", flush=True))
