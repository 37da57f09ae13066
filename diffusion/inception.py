r"""The FID feature network: Inception-v3 "pool3" features, as standard FID computes them.

FID (Heusel et al. 2017) is the Fréchet distance (:mod:`diffusion.metrics`) between Gaussian fits
of the 2048-d pool3 activations of one particular network: the TensorFlow Inception-v3 graph of
2015-12-05 that the reference FID code uses. pytorch-fid (M. Seitzer, Apache-2.0) ported its
weights to PyTorch as ``pt_inception-2015-12-05-6726825d.pth``. :class:`FIDInceptionV3` rebuilds
that network in plain torch with the same parameter names and shapes, so those weights load with
``load_state_dict(strict=True)``. It differs from torchvision's ``inception_v3`` where the
TensorFlow graph does:

- the 3×3 average pools of the A, C and first E blocks' pool branches ignore the zero padding
  (TensorFlow's "SAME" average pool; ``count_include_pad=False``);
- the last E block (``Mixed_7c``) max-pools in its pool branch;
- the classifier has 1008 outputs, and there is no auxiliary classifier.

Input convention: images in [−1, 1] (the pipeline's range, and the one the graph scales its pixel
input to), resized bilinearly to 299×299 (``align_corners=False``), as pytorch-fid does.

Nothing is ever downloaded. To get the weights, once (the download on any machine with internet
access; the checkpoint is a plain state dict, read with ``torch.load(weights_only=True)``)::

    curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python -m diffusion.inception convert pt_inception-2015-12-05-6726825d.pth fid_inception.safetensors

then ``load_fid_inception("fid_inception.safetensors").features(x)``; loading reads safetensors
only, never pickle. Scores from other Inception weights (torchvision's, say) are not FID.
"""  # noqa: E501

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor, nn

from diffusion.serialization import (
    WeightsIntegrityError,
    _write_atomic,
    save_model_bytes,
    sha256_hex,
)

__all__ = [
    "CONVERT_COMMAND",
    "FEATURE_DIM",
    "INPUT_SIZE",
    "NUM_CLASSES",
    "PYTORCH_FID_URL",
    "FIDInceptionV3",
    "convert_pytorch_fid_weights",
    "load_fid_inception",
]

FEATURE_DIM = 2048  # pool3
NUM_CLASSES = 1008  # the width of the 2015-12-05 graph's softmax
INPUT_SIZE = 299
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = (
    f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PYTORCH_FID_FILE}"
)
# torch.hub's naming convention: the file name ends with the first hex digits of its SHA-256.
_PYTORCH_FID_SHA256_PREFIX = "6726825d"
CONVERT_COMMAND = (
    f"python -m diffusion.inception convert {PYTORCH_FID_FILE} fid_inception.safetensors"
)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class _ConvBN(nn.Module):
    """Conv (no bias) → BatchNorm (TensorFlow's ε = 10⁻³) → ReLU: every layer of the network."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _row(c_in: int, c_out: int, k: int) -> _ConvBN:
    """A 1×k convolution, padded to keep the size (half of a factorised k×k)."""
    return _ConvBN(c_in, c_out, (1, k), padding=(0, k // 2))


def _col(c_in: int, c_out: int, k: int) -> _ConvBN:
    """A k×1 convolution, padded to keep the size."""
    return _ConvBN(c_in, c_out, (k, 1), padding=(k // 2, 0))


def _chain(x: Tensor, *layers: nn.Module) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _pool3x3_same(x: Tensor, kind: str) -> Tensor:
    """3×3 stride-1 "SAME" pooling as TensorFlow computes it: the average counts only the pixels
    inside the image (``count_include_pad=False``), not the zero padding."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _reduce3x3(x: Tensor) -> Tensor:
    """The pool branch of the grid-reduction blocks: 3×3 max pool, stride 2, no padding."""
    return F.max_pool2d(x, 3, stride=2)


class _BlockA(nn.Module):
    """35×35 block (Mixed_5b–d): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg pool→1×1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(x, self.branch5x5_1, self.branch5x5_2),
                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                self.branch_pool(_pool3x3_same(x, "avg")),
            ],
            dim=1,
        )


class _BlockB(nn.Module):
    """35×35 → 17×17 reduction (Mixed_6a): 3×3/2 | 1×1→3×3→3×3/2 | max pool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                _reduce3x3(x),
            ],
            dim=1,
        )


class _BlockC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (Mixed_6b–e), c7 inner channels:
    1×1 | 1×1→1×7→7×1 | 1×1→7×1→1×7→7×1→1×7 | avg pool→1×1."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _row(c7, c7, 7)
        self.branch7x7_3 = _col(c7, 192, 7)
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _col(c7, c7, 7)
        self.branch7x7dbl_3 = _row(c7, c7, 7)
        self.branch7x7dbl_4 = _col(c7, c7, 7)
        self.branch7x7dbl_5 = _row(c7, 192, 7)
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        double = (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3)
        double += (self.branch7x7dbl_4, self.branch7x7dbl_5)
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                _chain(x, *double),
                self.branch_pool(_pool3x3_same(x, "avg")),
            ],
            dim=1,
        )


class _BlockD(nn.Module):
    """17×17 → 8×8 reduction (Mixed_7a): 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max pool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _row(192, 192, 7)
        self.branch7x7x3_3 = _col(192, 192, 7)
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        seven = (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4)
        return torch.cat(
            [_chain(x, self.branch3x3_1, self.branch3x3_2), _chain(x, *seven), _reduce3x3(x)],
            dim=1,
        )


class _BlockE(nn.Module):
    """8×8 block with split 3×3 convolutions (Mixed_7b, Mixed_7c):
    1×1 | 1×1→(1×3, 3×1) | 1×1→3×3→(1×3, 3×1) | pool→1×1, ``pool`` "avg" or "max"."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _row(384, 384, 3)
        self.branch3x3_2b = _col(384, 384, 3)
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _row(384, 384, 3)
        self.branch3x3dbl_3b = _col(384, 384, 3)
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(single),
                self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(_pool3x3_same(x, self.pool)),
            ],
            dim=1,
        )


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (TensorFlow 2015-12-05 graph, pytorch-fid's parameter names).

    ``features(x)`` gives the 2048-d pool3 features that FID is defined on; ``forward(x)`` the
    1008-way logits. Built in eval mode (BatchNorm uses the stored statistics): it is a fixed
    feature extractor. Random weights until a checkpoint is loaded, see
    :func:`load_fid_inception`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)  # 299 → 149
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)  # → 147
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)  # then max pool → 73
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)  # → 71, then max pool → 35
        self.Mixed_5b = _BlockA(192, pool_features=32)  # → 256 channels
        self.Mixed_5c = _BlockA(256, pool_features=64)  # → 288
        self.Mixed_5d = _BlockA(288, pool_features=64)  # → 288
        self.Mixed_6a = _BlockB(288)  # → 768 × 17×17
        self.Mixed_6b = _BlockC(768, c7=128)
        self.Mixed_6c = _BlockC(768, c7=160)
        self.Mixed_6d = _BlockC(768, c7=160)
        self.Mixed_6e = _BlockC(768, c7=192)
        self.Mixed_7a = _BlockD(768)  # → 1280 × 8×8
        self.Mixed_7b = _BlockE(1280, pool="avg")  # → 2048
        self.Mixed_7c = _BlockE(2048, pool="max")  # the FID graph's max pool
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.eval()

    def _pool3(self, x: Tensor) -> Tensor:
        """[N, 3, 299, 299] in [−1, 1] → [N, 2048]: the network up to its global average pool."""
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = _chain(_reduce3x3(x), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = _chain(_reduce3x3(x), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a)
        x = _chain(x, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)
        x = _chain(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def features(self, x: Tensor) -> Tensor:
        """pool3 features, [N, 2048] float32, of images ``x``: [N, C, H, W] in [−1, 1].

        C = 1 is repeated to RGB; any H×W is resized bilinearly to 299×299
        (``align_corners=False``, no antialiasing: pytorch-fid's resize, which commutes with its
        [0, 1] → [−1, 1] scaling). ``x`` is moved to the network's device and computed in the
        parameters' dtype (float32 for FID), with autocast off. No gradient mode is imposed:
        wrap calls in ``torch.no_grad()`` for evaluation.
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(
                f"expected floating-point images in [-1, 1], got {x.dtype}; convert uint8 pixels "
                "with x.float() / 127.5 - 1"
            )
        weight = self.fc.weight
        x = x.to(device=weight.device, dtype=weight.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
                x = F.interpolate(
                    x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
                )
            x = x.expand(-1, 3, -1, -1)  # grey → RGB (a no-op for 3 channels)
            return self._pool3(x).float()

    def forward(self, x: Tensor) -> Tensor:
        """Logits over the graph's 1008 classes (same input convention as :meth:`features`)."""
        return self.fc(self.features(x).to(self.fc.weight.dtype))


# --------------------------------------------------------------------------------------------
# Weights: safetensors only at load time; the one-off conversion from pytorch-fid's .pth
# --------------------------------------------------------------------------------------------


def _check_state_dict(state: Mapping[str, Tensor], model: nn.Module, name: str) -> None:
    """Raise ValueError, listing what differs, unless ``state`` has exactly ``model``'s keys and
    shapes (``load_state_dict(strict=True)`` would report the same, less readably)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {list(state[k].shape)} (expected {list(shape)})"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    problems = [
        f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("reshaped", reshaped),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"{name} does not hold FID Inception-v3 weights: {'; '.join(problems)}. Expected the "
            f"pytorch-fid state dict {PYTORCH_FID_FILE} from {PYTORCH_FID_URL}"
        )


def _from_state_dict(state: Mapping[str, Tensor], name: str) -> FIDInceptionV3:
    """The network holding ``state``'s tensors (no copy, no random initialisation), float32,
    after a strict check of names and shapes."""
    with torch.device("meta"):  # shapes only: every tensor is then taken from ``state``
        model = FIDInceptionV3()
    _check_state_dict(state, model, name)
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval()


def _convert_hint(path: Path) -> str:
    src = path if path.suffix == ".pth" else PYTORCH_FID_FILE
    return f"python -m diffusion.inception convert {src} {path.with_suffix('.safetensors')}"


def load_fid_inception(
    path: str | os.PathLike[str], *, expected_sha256: str | None = None
) -> FIDInceptionV3:
    """The FID Inception-v3 with weights from a ``.safetensors`` file written by
    ``python -m diffusion.inception convert``: on CPU, eval mode, parameters frozen.

    Anything else (pytorch-fid's ``.pth`` above all) is refused with the conversion command:
    loading never unpickles. ``expected_sha256``, when given, is checked before parsing.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: FID Inception weights are loaded from .safetensors only (a .pth file would "
            f"need pickle); convert it once with: {_convert_hint(path)}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; nothing is downloaded implicitly: fetch {PYTORCH_FID_URL} "
            f"on a machine with internet access, then run: {CONVERT_COMMAND}"
        )
    data = path.read_bytes()
    actual = sha256_hex(data)
    if expected_sha256 is not None and expected_sha256.lower() != actual:
        raise WeightsIntegrityError(
            f"{path}: SHA-256 mismatch (expected {expected_sha256}, actual {actual}); the file "
            f"is truncated or was modified; convert it again: {CONVERT_COMMAND}"
        )
    try:
        state = safetensors.torch.load(data)
    except SafetensorError as exc:
        if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":  # torch.save's zip / legacy pickle
            raise ValueError(
                f"{path} is a PyTorch (pickle) checkpoint with a .safetensors name; convert it: "
                f"python -m diffusion.inception convert {path} "
                f"{path.with_name(path.stem + '-converted.safetensors')}"
            ) from exc
        raise WeightsIntegrityError(
            f"{path}: not a readable safetensors file ({exc}); convert the pytorch-fid weights "
            f"again: {CONVERT_COMMAND}"
        ) from exc
    return _from_state_dict(state, str(path)).requires_grad_(False)


def convert_pytorch_fid_weights(
    src: str | os.PathLike[str], dst: str | os.PathLike[str]
) -> tuple[str, str]:
    """Convert pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a plain state dict) to
    safetensors at ``dst``, written atomically. Returns ``(src_sha256, dst_sha256)``.

    The source is read with ``torch.load(map_location="cpu", weights_only=True)`` and must hold
    exactly :class:`FIDInceptionV3`'s keys and shapes (it is loaded with ``strict=True`` before
    anything is written). Tensors are stored unchanged; the header records the source file name
    and digest.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"the destination must end in .safetensors, got {dst}")
    if not src.is_file():
        raise FileNotFoundError(
            f"{src} does not exist; download {PYTORCH_FID_URL} on a machine with internet access"
        )
    src_sha256 = sha256_hex(src.read_bytes())
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError... all mean the same here
        raise ValueError(
            f"{src}: torch.load(weights_only=True) cannot read it ({type(exc).__name__}: {exc}); "
            f"expected a plain state dict such as {PYTORCH_FID_FILE}"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{src} is not a plain state dict (name → tensor): {type(state)}")

    ordered = {k: state[k] for k in _from_state_dict(state, str(src)).state_dict()}
    weights, _ = save_model_bytes(
        ordered,
        config={},
        extra_metadata={
            "network": "FID Inception-v3 (TensorFlow 2015-12-05 graph, pytorch-fid names)",
            "source_file": src.name,
            "source_sha256": src_sha256,
        },
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(dst, weights)
    return src_sha256, sha256_hex(weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.inception",
        description="FID Inception-v3 weights: convert pytorch-fid's .pth to safetensors.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help=f"SRC.pth → DST.safetensors (SRC: {PYTORCH_FID_FILE} from {PYTORCH_FID_URL})",
    )
    convert.add_argument("src", help=f"the pytorch-fid state dict, {PYTORCH_FID_FILE}")
    convert.add_argument("dst", help="where to write the .safetensors file")
    args = parser.parse_args(argv)

    try:
        src_sha256, dst_sha256 = convert_pytorch_fid_weights(args.src, args.dst)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"source {args.src}  sha256 {src_sha256}")
    if not src_sha256.startswith(_PYTORCH_FID_SHA256_PREFIX):
        print(
            f"note: this is not pytorch-fid's {PYTORCH_FID_FILE} (its SHA-256 begins with "
            f"{_PYTORCH_FID_SHA256_PREFIX}); features from other weights do not give standard FID"
        )
    print(f"wrote  {args.dst}  sha256 {dst_sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
