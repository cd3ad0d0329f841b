"""SegMamba (V1, MICCAI 2024) re-implemented from the official code (docs/models.md, "SegMamba V1 network").

Module names, nesting and registration order reproduce the official state dict exactly, so official
checkpoints load with ``strict=True``. The tri-oriented Mamba runs through :mod:`SegMambaSlicerLib.networks.ops.mixers`,
hence on any torch device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .lean_blocks import use_lean_blocks
from .ops.mixers import TriOrientedMamba
from .segmamba_encoder_decoder import (
    InputSizeError,
    NetworkConfigError,
    UnexpectedArgumentsError,
    add_unetr_blocks,
    check_config,
    check_size_multiple,
    to_network_layout,
    unetr_decode,
    use_layout_preserving_layers,
    volume_from_tokens,
)

__all__ = ["InputSizeError", "SegMambaV1"]


class MambaLayer(nn.Module):
    """LayerNorm + tri-oriented Mamba over the flattened voxels (last axis fastest), optional residual."""

    def __init__(self, dim: int, nslices: int, residual: bool, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = TriOrientedMamba(d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand, nslices=nslices)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)  # a view when x is channels-last
        out = volume_from_tokens(self.mamba(self.norm(tokens)), like=x)
        return out + x if self.residual else out


class GSC(nn.Module):
    """Gated spatial convolution: two conv branches summed (not multiplied), 1x1 fusion, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(channels, channels, 3, 1, 1)
        self.norm = nn.InstanceNorm3d(channels)
        self.nonliner = nn.ReLU()
        self.proj2 = nn.Conv3d(channels, channels, 3, 1, 1)
        self.norm2 = nn.InstanceNorm3d(channels)
        self.nonliner2 = nn.ReLU()
        self.proj3 = nn.Conv3d(channels, channels, 1, 1, 0)
        self.norm3 = nn.InstanceNorm3d(channels)
        self.nonliner3 = nn.ReLU()
        self.proj4 = nn.Conv3d(channels, channels, 1, 1, 0)
        self.norm4 = nn.InstanceNorm3d(channels)
        self.nonliner4 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        a = self.nonliner(self.norm(self.proj(x)))
        a = self.nonliner2(self.norm2(self.proj2(a)))
        b = self.nonliner3(self.norm3(self.proj3(x)))
        return self.nonliner4(self.norm4(self.proj4(a + b))) + x


class MlpChannel(nn.Module):
    """1x1x1 conv MLP (C -> 2C -> C, exact GELU) applied to each skip output; no residual."""

    def __init__(self, hidden_size: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(hidden_size, mlp_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(mlp_dim, hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MambaEncoder(nn.Module):
    """Four stages of (down-sampling, GSC, MambaLayers); each stage's skip output is IN + MLP of its features."""

    def __init__(self, in_chans: int, depths: Sequence[int], dims: Sequence[int], nslices: Sequence[int],
                 mamba_residual: bool) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv3d(in_chans, dims[0], kernel_size=7, stride=2, padding=3))]
            + [nn.Sequential(nn.InstanceNorm3d(dims[i - 1]), nn.Conv3d(dims[i - 1], dims[i], kernel_size=2, stride=2))
               for i in range(1, 4)]
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*[MambaLayer(dims[i], nslices[i], mamba_residual) for _ in range(depths[i])])
            for i in range(4)
        )
        self.gscs = nn.ModuleList(GSC(dims[i]) for i in range(4))
        for i in range(4):
            self.add_module(f"norm{i}", nn.InstanceNorm3d(dims[i]))
        self.mlps = nn.ModuleList(MlpChannel(dims[i], 2 * dims[i]) for i in range(4))

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(4):
            x = self.stages[i](self.gscs[i](self.downsample_layers[i](x)))
            outs.append(self.mlps[i](getattr(self, f"norm{i}")(x)))
        return outs


class SegMambaV1(nn.Module):
    """SegMamba: MambaEncoder (vit) + MONAI UNETR-style residual encoders/decoders, logits at input size.

    ``mamba_residual=False`` gives the variant before 2024-06-05 (no residual around each MambaLayer), which
    checkpoints of that period expect; the state-dict keys are identical.
    """

    def __init__(
        self, in_chans: int = 1, out_chans: int = 13, depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384), hidden_size: int = 768, norm_name: str = "instance",
        res_block: bool = True, spatial_dims: int = 3, nslices: Sequence[int] = (64, 32, 16, 8),
        mamba_residual: bool = True, **unused_official_kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = set(unused_official_kwargs) - {"drop_path_rate", "layer_scale_init_value", "conv_block"}
        if unknown:
            names = ", ".join(sorted(unknown))
            raise UnexpectedArgumentsError(f"SegMambaV1 got unexpected arguments: {names}")
        check_config("SegMamba", depths, feat_size, spatial_dims)
        if len(nslices) != 4:
            raise NetworkConfigError(f"SegMamba needs 4 nslices values (one per stage); got {list(nslices)}.")
        self.vit = MambaEncoder(in_chans, depths, feat_size, nslices, mamba_residual)
        add_unetr_blocks(self, in_chans, out_chans, feat_size, hidden_size, norm_name, res_block, spatial_dims)
        use_layout_preserving_layers(self)
        use_lean_blocks(self)

    def _check_input_size(self, spatial: tuple[int, ...]) -> None:
        """Fail before any work when the size cannot pass the down-sampling or the slice interleave."""
        check_size_multiple("SegMamba", spatial)
        for i, stage in enumerate(self.vit.stages):
            nslices = stage[0].mamba.nslices
            grid = [s // 2 ** (i + 1) for s in spatial]
            if math.prod(grid) % nslices:
                raise InputSizeError(
                    f"SegMamba stage {i} sees a {'x'.join(map(str, grid))} grid whose voxel count is not a multiple "
                    f"of its {nslices} slices (input {spatial}); use a window size that is a multiple of 32 per axis "
                    "(official: 128)."
                )

    def forward(self, x_in: Tensor) -> Tensor:
        """(B, in_chans, D, H, W) -> logits (B, out_chans, D, H, W); sizes as checked by _check_input_size."""
        self._check_input_size(tuple(x_in.shape[2:]))
        x_in = to_network_layout(x_in)
        outs = self.vit(x_in)
        # encoder1 after the Mamba encoder (they are independent), so that its full-resolution output is
        # not held through the Mamba layers' peak; a list that unetr_decode empties (frees) once read
        enc1 = [self.encoder1(x_in)]
        return unetr_decode(self, enc1, outs).contiguous()
