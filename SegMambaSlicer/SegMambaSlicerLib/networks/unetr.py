"""The UNETR-style encoder/decoder shared by SegMamba V1 and V2 (MODELS.md §1.1, §2.4, §3.2).

Both official classes register ``encoder1..5``, ``decoder5..1`` and ``out`` (MONAI blocks) after their
Mamba encoder ``vit`` and decode its four outputs the same way; only what feeds ``vit`` differs.
Keeping the blocks in one place keeps both key lists and both decoders identical by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import Tensor, nn

from ..errors import InputImageError, ModelCardError

#: The official code hard-codes 48 channels for the stem / encoder1 output and the output head.
HEAD_CHANNELS = 48
#: Four stride-2 reductions: every spatial size must be a multiple of this.
SIZE_MULTIPLE = 16


class NetworkConfigError(ModelCardError):
    """The constructor arguments describe a network the official code cannot build."""


class InputSizeError(InputImageError):
    """An input's spatial size does not fit the network's down-sampling."""


def check_config(name: str, depths: Sequence[int], feat_size: Sequence[int], spatial_dims: int) -> None:
    """Reject configurations the official classes cannot build, with the reason instead of a shape error."""
    if spatial_dims != 3:
        raise NetworkConfigError(f"{name} is a 3-D network; got spatial_dims={spatial_dims}.")
    if len(depths) != 4 or len(feat_size) != 4:
        raise NetworkConfigError(
            f"{name} has exactly 4 encoder stages; got depths={list(depths)}, feat_size={list(feat_size)}."
        )
    if feat_size[0] != HEAD_CHANNELS:
        raise NetworkConfigError(
            f"{name} needs feat_size[0] == {HEAD_CHANNELS} (hard-coded in the official stem and output head); "
            f"got feat_size={list(feat_size)}."
        )
    if min(depths) < 1:
        raise NetworkConfigError(f"Every {name} stage needs at least one block; got depths={list(depths)}.")


def check_size_multiple(name: str, spatial: Sequence[int]) -> None:
    """Fail before any work when a size cannot pass the four stride-2 reductions."""
    if any(s % SIZE_MULTIPLE for s in spatial):
        raise InputSizeError(
            f"{name} needs every spatial size to be a multiple of {SIZE_MULTIPLE}, got {tuple(spatial)}; pad or crop "
            "the volume, or use a window size that is a multiple of 32 per axis (official: 128)."
        )


def add_unetr_blocks(
    net: nn.Module, in_chans: int, out_chans: int, feat_size: Sequence[int], hidden_size: int,
    norm_name: str | tuple, res_block: bool, spatial_dims: int,
) -> None:
    """Register encoder1..5, decoder5..1 and out on ``net`` in the official order (call after ``net.vit``)."""

    def basic(cin: int, cout: int) -> UnetrBasicBlock:
        return UnetrBasicBlock(spatial_dims, cin, cout, kernel_size=3, stride=1, norm_name=norm_name,
                               res_block=res_block)

    def up(cin: int, cout: int) -> UnetrUpBlock:
        return UnetrUpBlock(spatial_dims, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                            res_block=res_block)

    f = list(feat_size)
    net.encoder1 = basic(in_chans, f[0])
    net.encoder2 = basic(f[0], f[1])
    net.encoder3 = basic(f[1], f[2])
    net.encoder4 = basic(f[2], f[3])
    net.encoder5 = basic(f[3], hidden_size)
    net.decoder5 = up(hidden_size, f[3])
    net.decoder4 = up(f[3], f[2])
    net.decoder3 = up(f[2], f[1])
    net.decoder2 = up(f[1], f[0])
    net.decoder1 = basic(f[0], f[0])
    net.out = UnetOutBlock(spatial_dims, HEAD_CHANNELS, out_chans)


def unetr_decode(net: nn.Module, enc1: Tensor, outs: Sequence[Tensor]) -> Tensor:
    """Skip encoders on the four ``vit`` outputs, then the decoder chain down to full-resolution logits."""
    enc2 = net.encoder2(outs[0])
    enc3 = net.encoder3(outs[1])
    enc4 = net.encoder4(outs[2])
    dec = net.decoder5(net.encoder5(outs[3]), enc4)
    dec = net.decoder4(dec, enc3)
    dec = net.decoder3(dec, enc2)
    dec = net.decoder2(dec, enc1)
    return net.out(net.decoder1(dec))
