"""SegMamba-V2 (ge-xing/SegMamba-V2, IEEE TMI 2025), re-implemented (docs/models.md, "SegMamba-V2 network").

The module tree, attribute names and registration order reproduce the official ``SegMamba`` class of
``brats23/models_segmamba/segmambav2.py`` so that official checkpoints load with ``strict=True`` and give
the same logits. Differences from V1 that matter for numerics: the Mamba encoder (``vit``) is fed the
48-channel output of ``encoder1`` instead of the image, every stage runs a stack of large-kernel
convolution blocks with squeeze-and-excitation, and only the two deepest stages contain Mamba layers,
each of which scans the volume along three axis orders with one shared LayerNorm + Mamba.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .lean_blocks import use_lean_blocks
from .ops.mixers import Mamba
from .segmamba_encoder_decoder import HEAD_CHANNELS as STEM_CHANNELS
from .segmamba_encoder_decoder import (
    add_unetr_blocks,
    check_config,
    check_size_multiple,
    to_network_layout,
    unetr_decode,
    use_layout_preserving_layers,
    volume_from_tokens,
)
from .segmamba_v1 import MlpChannel  # the same skip head (fc1, GELU, fc2) in both versions

#: Stages (0-based) that hold Mamba layers; the shallower ones only have convolution blocks.
MAMBA_STAGES = (2, 3)


class ConvBlock(nn.Module):
    """Conv3d (bias) -> InstanceNorm (no affine) -> ReLU, stored as ``block.{0,1,2}`` like upstream."""

    def __init__(self, channels: int, kernel_size: int, padding: int, dilation: int = 1) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv3d(channels, channels, kernel_size, padding=padding, dilation=dilation),
            nn.InstanceNorm3d(channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: channel weights from the global mean, ``fc.0``/``fc.2`` are the Linears."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = channels // reduction
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc(x.mean(dim=(2, 3, 4)))
        return x * weights[:, :, None, None, None]


class LargeKernelConv(nn.Module):
    """Deep path (5³, 3³, dilated 3³) + shortcut path (3³, 1³) + identity, then SE; no final activation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.deep_path = nn.Sequential(
            ConvBlock(channels, 5, padding=2),
            ConvBlock(channels, 3, padding=1),
            ConvBlock(channels, 3, padding=2, dilation=2),
        )
        self.shortcut_path = nn.Sequential(
            ConvBlock(channels, 3, padding=1),
            ConvBlock(channels, 1, padding=0),
        )
        self.se = SEBlock(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.deep_path(x) + self.shortcut_path(x) + x)


class MambaLayer(nn.Module):
    """One LayerNorm + Mamba shared by three scans (flatten orders D-H-W, H-D-W, W-H-D), summed, + input.

    The scans are realised by swapping tensor axes 2↔3 and 2↔4 before the row-major flatten and swapping
    back afterwards, exactly the token orders of docs/models.md, "SegMamba-V2 network".
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand)

    def _scan(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        return volume_from_tokens(self.mamba(self.norm(tokens)), like=x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        along_h = self._scan(x.transpose(2, 3)).transpose(2, 3)
        along_w = self._scan(x.transpose(2, 4)).transpose(2, 4)
        return self._scan(x) + along_h + along_w + x


class MambaEncoder(nn.Module):
    """The ``vit`` branch: per stage strided conv, large-kernel blocks, Mamba (deep stages), IN + MLP head."""

    def __init__(self, depths: Sequence[int], dims: Sequence[int]) -> None:
        super().__init__()
        in_dims = [STEM_CHANNELS, *dims[:-1]]
        self.downsample_layers = nn.ModuleList(
            nn.Sequential(nn.Conv3d(cin, cout, 3, stride=2, padding=1)) for cin, cout in zip(in_dims, dims)
        )
        # Identity keeps the official indices (stages.2, stages.3) for the stages without Mamba; it has no keys.
        self.stages = nn.ModuleList(
            nn.Sequential(*(MambaLayer(dim) for _ in range(depth))) if i in MAMBA_STAGES else nn.Identity()
            for i, (depth, dim) in enumerate(zip(depths, dims))
        )
        self.gscs = nn.ModuleList(
            nn.Sequential(*(LargeKernelConv(dim) for _ in range(depth))) for depth, dim in zip(depths, dims)
        )
        self.norms = nn.ModuleList(nn.InstanceNorm3d(dim) for dim in dims)
        self.mlps = nn.ModuleList(MlpChannel(dim, 2 * dim) for dim in dims)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for down, gsc, stage, norm, mlp in zip(
            self.downsample_layers, self.gscs, self.stages, self.norms, self.mlps
        ):
            x = stage(gsc(down(x)))
            outs.append(mlp(norm(x)))
        return outs


class SegMambaV2(nn.Module):
    """SegMamba-V2 with the official constructor signature (upstream class name ``SegMamba``).

    The official scripts call it positionally (``SegMamba(4, 4)``), so the positional order is kept,
    including ``drop_path_rate``, ``layer_scale_init_value`` and ``conv_block``, which upstream accepts
    but never uses.
    """

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 13,
        depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        hidden_size: int = 768,
        norm_name: str | tuple = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        del drop_path_rate, layer_scale_init_value, conv_block  # unused upstream as well
        check_config("SegMamba-V2", depths, feat_size, spatial_dims)
        self.vit = MambaEncoder(depths, list(feat_size))
        add_unetr_blocks(self, in_chans, out_chans, feat_size, hidden_size, norm_name, res_block, spatial_dims)
        use_layout_preserving_layers(self)
        use_lean_blocks(self)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        check_size_multiple("SegMamba-V2", x_in.shape[2:])
        enc1 = [self.encoder1(to_network_layout(x_in))]  # a list that unetr_decode empties (frees) once read
        return unetr_decode(self, enc1, self.vit(enc1[0])).contiguous()
