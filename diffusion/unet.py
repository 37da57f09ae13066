"""The noise-prediction network: a UNet in the style of DDPM (Ho et al. 2020, Appendix B).

The network maps a noisy image x_t, its timestep t and (optionally) a class label y to an
output of the same shape, read as ε_θ(x_t, t, y), x̂₀ or v according to the parameterization
chosen elsewhere; the network itself knows nothing about the schedule.

Architecture (Ho et al. 2020, after PixelCNN++ / Wide ResNet):

* t → sinusoidal embedding (Vaswani et al. 2017) → Linear → SiLU → Linear; a learned class
  embedding with ``num_classes + 1`` rows is added to it. Row ``num_classes`` is the *null
  class* ∅ used to train and sample with classifier-free guidance (Ho & Salimans 2022).
* Encoder: per resolution level, ``num_res_blocks`` residual blocks (self-attention after each
  at the ``attention_resolutions``), then a stride-2 convolution; every output is kept as a skip.
* Middle: residual block → self-attention → residual block at the lowest resolution.
* Decoder: per level, ``num_res_blocks + 1`` residual blocks, each fed the concatenation of the
  current features and one encoder skip, then nearest-neighbour ×2 upsampling + convolution.
* Output: GroupNorm → SiLU → 3×3 convolution initialised to zero, so ε_θ ≡ 0 at initialisation.

Residual blocks inject the embedding with a scale and shift after the second GroupNorm
("AdaGN", Dhariwal & Nichol 2021): h ← GN(h)·(1 + s) + b, with (s, b) = Linear(SiLU(emb)).

Example: the DDPM CIFAR-10 shape (32×32 RGB, about 38M parameters with scale-shift blocks;
``tests/diffusion/test_unet.py`` checks the count)::

    config = UNetConfig(resolution=32, in_channels=3, base_channels=128,
                        channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                        attention_resolutions=(16,), dropout=0.1)
    model = UNet(config)
    eps_pred = model(xt, t)            # xt: [B, 3, 32, 32], t: [B] integer timesteps
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]


def _require_int(name: str, value: Any, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"UNetConfig.{name} must be an integer >= {minimum}, got {value!r}{hint}")


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a :class:`UNet`. Plain data: JSON via :meth:`to_dict` / :meth:`from_dict`.

    ``attention_resolutions`` lists feature-map sizes (not level indices) at which
    self-attention follows each residual block; with ``resolution=32`` and
    ``channel_mult=(1, 2, 2, 2)`` the sizes reached are 32, 16, 8 and 4.
    ``num_classes=None`` makes the model unconditional.
    """

    resolution: int = 8
    in_channels: int = 1
    out_channels: int | None = None
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4,)
    num_heads: int = 4
    dropout: float = 0.0
    num_classes: int | None = None
    groups: int = 8

    # Read by pydantic (no import needed) when a pipeline config embeds this dataclass:
    # unknown keys are an error there too, as in from_dict; NaN and infinity too, as
    # in every section (tasks.bounds).
    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid", "allow_inf_nan": False}

    def __post_init__(self) -> None:
        # Accept lists (JSON, YAML) and store tuples so the config stays hashable.
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ValueError(f"UNetConfig.{name} must be a list of integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))

        _require_int("resolution", self.resolution, 1)
        _require_int("in_channels", self.in_channels, 1)
        if self.in_channels > 4:
            raise ValueError(
                f"UNetConfig.in_channels must be 1..4 (grey, RGB, RGBA), got {self.in_channels}"
            )
        if self.out_channels is not None:
            _require_int("out_channels", self.out_channels, 1)
            if self.out_channels > 4:
                raise ValueError(
                    f"UNetConfig.out_channels must be 1..4 or null (= in_channels), "
                    f"got {self.out_channels}"
                )
        _require_int("base_channels", self.base_channels, 1)
        if not self.channel_mult:
            raise ValueError(
                "UNetConfig.channel_mult must list one multiplier or more, e.g. [1, 2]"
            )
        for m in self.channel_mult:
            _require_int("channel_mult", m, 1, " (every multiplier must be a positive integer)")
        _require_int("num_res_blocks", self.num_res_blocks, 1)
        _require_int("num_heads", self.num_heads, 1)
        _require_int("groups", self.groups, 1)
        if self.num_classes is not None:
            _require_int("num_classes", self.num_classes, 1, " (use null for unconditional)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")

        factor = 2 ** (len(self.channel_mult) - 1)
        if self.resolution % factor:
            raise ValueError(
                f"UNetConfig.resolution={self.resolution} must be divisible by "
                f"2**(len(channel_mult)-1)={factor}; use fewer channel_mult levels or a "
                f"resolution that is a multiple of {factor}"
            )
        reached = self.resolutions
        for r in self.attention_resolutions:
            _require_int("attention_resolutions", r, 1)
            if r not in reached:
                raise ValueError(
                    f"UNetConfig.attention_resolutions contains {r}, which the network never "
                    f"reaches; choose among {list(reached)} (feature-map sizes, not level indices)"
                )
        attn_channels = {self.base_channels * self.channel_mult[-1]}  # middle block
        attn_channels |= {
            self.base_channels * m
            for m, r in zip(self.channel_mult, reached, strict=True)
            if r in self.attention_resolutions
        }
        for c in sorted(attn_channels):
            if c % self.num_heads:
                raise ValueError(
                    f"UNetConfig.num_heads={self.num_heads} must divide the channel count {c} "
                    f"of every attention layer; pick a divisor of {c}"
                )

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level: resolution, resolution/2, ..."""
        return tuple(self.resolution // 2**i for i in range(len(self.channel_mult)))

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"UNetConfig got unknown keys {unknown}; valid keys are {sorted(known)}"
            )
        return cls(**d)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t·ω_k), sin(t·ω_k)], ω_k = max_period^(−k/(dim/2)); [B, dim].

    Computed in float32 whatever the dtype of ``t`` (integer or float timesteps).
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    omega = torch.exp(-math.log(max_period) * k / half)
    args = t.float()[:, None] * omega[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GN→SiLU→conv, AdaGN with the embedding, SiLU→dropout→conv, plus a (1×1) skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = _group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # GN(h)·(1 + s) + b
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, with a residual connection.

    Works on tokens [B, HW, C] so q, k, v reach ``scaled_dot_product_attention`` with a
    contiguous last dimension, which its fused (flash / memory-efficient) kernels require.
    """

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        qkv = self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, HW, d]
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Residual blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, blocks: list[ResBlock], attn: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)


class UNet(nn.Module):
    """ε_θ(x_t, t, y): ``forward(x, t, labels=None)`` → tensor shaped like ``x``
    (with ``out_channels`` channels)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.base_channels
        emb_dim = 4 * ch
        attn_at = set(cfg.attention_resolutions)

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, cfg.dropout, cfg.groups)

        def attn(c: int, r: int) -> nn.Module:
            return AttentionBlock(c, cfg.num_heads, cfg.groups) if r in attn_at else nn.Identity()

        self.time_mlp = nn.Sequential(
            nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_emb = (
            nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None
        )
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        # Encoder: remember the channel count of every skip it produces.
        skips, c = [ch], ch
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, (mult, r) in enumerate(zip(cfg.channel_mult, cfg.resolutions, strict=True)):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(res(c, ch * mult))
                c = ch * mult
                attns.append(attn(c, r))
                skips.append(c)
            self.down.append(Level(blocks, attns))
            last = level == len(cfg.channel_mult) - 1
            self.downsample.append(nn.Identity() if last else Downsample(c))
            if not last:
                skips.append(c)

        self.mid_block1 = res(c, c)
        self.mid_attn = AttentionBlock(c, cfg.num_heads, cfg.groups)
        self.mid_block2 = res(c, c)

        # Decoder: one more block per level than the encoder, each consuming one skip.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            mult, r = cfg.channel_mult[level], cfg.resolutions[level]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(res(c + skips.pop(), ch * mult))
                c = ch * mult
                attns.append(attn(c, r))
            self.up.append(Level(blocks, attns))
            self.upsample.append(Upsample(c) if level > 0 else nn.Identity())

        self.norm_out = _group_norm(c, cfg.groups)
        self.conv_out = nn.Conv2d(c, cfg.output_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        cfg, b = self.config, x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(
                f"t must have shape [B]=[{b}] (one timestep per image), got {list(t.shape)}"
            )
        dtype = self.time_mlp[0].weight.dtype  # float32 sinusoids → the weights' dtype
        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels).to(dtype))
        if self.class_emb is None:
            if labels is not None:
                raise ValueError(
                    "labels were given to an unconditional UNet (num_classes=None); pass "
                    "labels=None or build the model with UNetConfig(num_classes=...)"
                )
            return emb
        if labels is None:  # the null class ∅ (classifier-free guidance)
            labels = torch.full((b,), cfg.num_classes, dtype=torch.long, device=x.device)
        if labels.shape != (b,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be an integer tensor of shape [B]=[{b}] with values in "
                f"0..{cfg.num_classes} ({cfg.num_classes} = null class), got "
                f"{labels.dtype} {list(labels.shape)}"
            )
        return emb + self.class_emb(labels.long())

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B, C, H, W]; t: [B] timesteps (int or float); labels: [B] class indices or None.

        The network is convolutional: H, W need only be divisible by 2**(levels−1); attention
        sits at the levels whose size is in ``attention_resolutions`` for ``config.resolution``.
        """
        cfg = self.config
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if (
            x.ndim != 4
            or x.shape[1] != cfg.in_channels
            or x.shape[-2] % factor
            or x.shape[-1] % factor
        ):
            raise ValueError(
                f"x must be [B, {cfg.in_channels}, H, W] with H and W divisible by {factor}, "
                f"got {list(x.shape)}"
            )
        emb = self._embed(x, t, labels)

        h = self.conv_in(x)
        hs = [h]
        for level, down in zip(self.down, self.downsample, strict=True):
            for block, attn in zip(level.blocks, level.attn, strict=True):
                h = attn(block(h, emb))
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)

        for level, up in zip(self.up, self.upsample, strict=True):
            for block, attn in zip(level.blocks, level.attn, strict=True):
                skip = hs.pop()
                h = attn(block(torch.cat([h, skip.to(h.dtype)], dim=1), emb))
            h = up(h)

        return self.conv_out(F.silu(self.norm_out(h)))
