"""Model weights on disk: safetensors for tensors, JSON for configuration, never pickle.

A saved model is a directory with two files:

    model.safetensors   the state dict (header metadata: ``extra_metadata``, strings only)
    config.json         the caller's config plus ``weights_sha256``, the SHA-256 of the weights
                        file; written last, so its presence marks a complete save

The ``*_bytes`` functions do the (de)serialisation only, so callers that write through other
storage (object stores) reuse them; :func:`save_model` / :func:`load_model` add atomic local I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from diffusion.unet import UNet, UNetConfig

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "WeightsIntegrityError",
    "build_unet",
    "load_model",
    "load_model_bytes",
    "read_metadata",
    "save_model",
    "save_model_bytes",
    "sha256_hex",
    "unet_from_bytes",
    "unet_from_state",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_DIGEST_KEY = "weights_sha256"


class WeightsIntegrityError(ValueError):
    """The weights do not match their recorded digest, or are not a readable safetensors file."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_model_bytes(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    extra_metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, bytes]:
    """Serialise to ``(weights, config_json)``: safetensors bytes and UTF-8 JSON bytes.

    Tensors are copied to contiguous CPU memory, so shared or strided tensors (tied weights,
    channels_last) are fine. ``config`` must be JSON-serialisable; its ``weights_sha256`` key,
    if any, is replaced by the digest of ``weights``.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor; safetensors "
                "stores tensors only (put other values in config)"
            )
        tensors[name] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)

    metadata = {"format": "pt"}
    for key, value in (extra_metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"extra_metadata must map str to str (safetensors header), got {key!r}: "
                f"{type(value).__name__}; encode other values with json.dumps"
            )
        metadata[key] = value
    weights = safetensors.torch.save(tensors, metadata=metadata)

    document = {**config, _DIGEST_KEY: sha256_hex(weights)}
    try:
        text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"config is not JSON-serialisable ({exc}); convert dataclasses with to_dict() and "
            "tuples, paths or numpy values to plain lists, strings and numbers"
        ) from exc
    return weights, (text + "\n").encode("utf-8")


def load_model_bytes(
    weights: bytes,
    config_bytes: bytes,
    *,
    expected_sha256: str | None = None,
    name: str = WEIGHTS_FILE,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`save_model_bytes`: ``(state_dict, config)`` on CPU.

    The weights are checked against ``expected_sha256`` and against the digest recorded in the
    config (each when present) before they are parsed. ``name`` labels the weights in errors.
    The returned config no longer holds ``weights_sha256``.
    """
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{CONFIG_FILE} for {name} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_FILE} for {name} must hold a JSON object, got {type(config)}")
    recorded = config.pop(_DIGEST_KEY, None)

    actual = sha256_hex(weights)
    for expected in (expected_sha256, recorded):
        if expected is not None and expected.lower() != actual:
            raise WeightsIntegrityError(
                f"{name}: SHA-256 mismatch (expected {expected}, actual {actual}); the file is "
                "truncated or was modified; re-download or re-export it"
            )
    try:
        state_dict = safetensors.torch.load(weights)
    except SafetensorError as exc:
        raise WeightsIntegrityError(
            f"{name}: not a readable safetensors file ({exc}); the file is truncated or was "
            "modified; re-download or re-export it"
        ) from exc
    return state_dict, config


def read_metadata(weights: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors header (``extra_metadata`` plus format)."""
    try:
        (n,) = struct.unpack("<Q", weights[:8])
        header = json.loads(weights[8 : 8 + n])
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsIntegrityError(f"not a readable safetensors header: {exc}") from exc
    return dict(header.get("__metadata__", {}))


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_model(
    directory: str | os.PathLike[str],
    model_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model.safetensors`` then ``config.json`` into ``directory`` (created if needed).

    Each file is replaced atomically; an existing ``config.json`` is removed first, so a crash
    part-way leaves a directory without ``config.json``, which :func:`load_model` refuses.
    """
    directory = Path(directory)
    weights, config_bytes = save_model_bytes(model_state, config, extra_metadata)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).unlink(missing_ok=True)
    _write_atomic(directory / WEIGHTS_FILE, weights)
    _write_atomic(directory / CONFIG_FILE, config_bytes)  # commit marker: last
    with contextlib.suppress(OSError):  # persist the renames where the platform allows
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return directory


def load_model(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a directory written by :func:`save_model`: ``(state_dict, config)``, verified."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} does not exist: {directory} is not a saved model, or its save did "
            f"not finish ({CONFIG_FILE} is written last); save the model again"
        )
    config_bytes = config_path.read_bytes()
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} does not exist although {CONFIG_FILE} does")
    return load_model_bytes(weights_path.read_bytes(), config_bytes, name=str(weights_path))


def unet_from_state(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> UNet:
    """A :class:`UNet` in eval mode from a model config's ``unet`` section and its weights."""
    model = UNet(UNetConfig.from_dict(config["unet"]))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def unet_from_bytes(
    weights: bytes,
    config_bytes: bytes,
    *,
    expected_sha256: str | None = None,
    name: str = WEIGHTS_FILE,
    require: tuple[str, ...] = ("unet",),
) -> tuple[UNet, dict[str, Any]]:
    """``(UNet in eval mode, config)`` from the two files of a saved model.

    The weights are checked against their digests (:func:`load_model_bytes`) before any tensor
    is parsed; ``require`` names the config sections that must be present (a pipeline model
    needs ``("unet", "diffusion")``)."""
    state_dict, config = load_model_bytes(
        weights, config_bytes, expected_sha256=expected_sha256, name=name
    )
    missing = [k for k in require if k not in config]
    if missing:
        raise ValueError(
            f"{CONFIG_FILE} for {name} lacks {', '.join(missing)}; it must hold "
            f"{', '.join(repr(k) for k in require)} sections as training writes them"
        )
    return unet_from_state(config, state_dict), config


def build_unet(directory: str | os.PathLike[str]) -> UNet:
    """A :class:`UNet` from ``config.json["unet"]`` with the saved weights, in eval mode."""
    state_dict, config = load_model(directory)
    if "unet" not in config:
        raise KeyError(
            f"{Path(directory) / CONFIG_FILE} has no 'unet' section; save the model with "
            "config={'unet': UNetConfig.to_dict(), ...}"
        )
    return unet_from_state(config, state_dict)
