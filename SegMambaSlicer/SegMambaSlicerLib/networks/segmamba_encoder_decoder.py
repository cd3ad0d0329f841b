"""The UNETR-style encoder/decoder shared by SegMamba V1 and V2 (docs/models.md, "UNETR encoder and decoder").

Both official classes register ``encoder1..5``, ``decoder5..1`` and ``out`` (MONAI blocks) after their
Mamba encoder ``vit`` and decode its four outputs the same way; only what feeds ``vit`` differs.
Keeping the blocks in one place keeps both key lists and both decoders identical by construction.

Memory layout: on CPU both networks run their activations channels-last (``torch.channels_last_3d``),
where oneDNN's 3-D convolutions are 1.4-4x faster than on channels-first tensors and the Mamba layers
read their tokens without transposing copies (docs/benchmarks.md). Two layers would silently convert
back to channels-first (``F.instance_norm`` makes its input contiguous; 1x1x1 convolutions take a
channels-first path on one thread), so :func:`use_layout_preserving_layers` retypes them into subclasses
whose forward keeps the layout; parameters, buffers and state-dict keys are untouched.

Memory: in inference the MONAI blocks run through :mod:`.lean_blocks` (retyped the same way), which
frees each full-resolution activation once its last use has passed; :func:`unetr_decode` hands
encoder1's output to decoder2 in a one-item list for that reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import Tensor, nn

from ..errors import InputImageError, ModelCardError
from .lean_blocks import normalise_centred_

#: The official code hard-codes 48 channels for the stem / encoder1 output and the output head.
HEAD_CHANNELS = 48
#: Four stride-2 reductions: every spatial size must be a multiple of this.
SIZE_MULTIPLE = 16


class NetworkConfigError(ModelCardError):
    """The constructor arguments describe a network the official code cannot build."""


class UnexpectedArgumentsError(NetworkConfigError, TypeError):
    """A constructor got arguments it does not take; a TypeError too, as Python raises for a signature."""


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


def unetr_decode(net: nn.Module, enc1: list[Tensor], outs: Sequence[Tensor]) -> Tensor:
    """Skip encoders on the four ``vit`` outputs, then the decoder chain down to full-resolution logits.

    ``enc1`` is a one-item list holding encoder1's output; decoder2 empties it, so that (in inference)
    the full-resolution skip is freed as soon as it has been read (:mod:`.lean_blocks`).
    """
    enc2 = net.encoder2(outs[0])
    enc3 = net.encoder3(outs[1])
    enc4 = net.encoder4(outs[2])
    dec = net.decoder5(net.encoder5(outs[3]), [enc4])
    del enc4
    dec = net.decoder4(dec, [enc3])
    del enc3
    dec = net.decoder3(dec, [enc2])
    del enc2
    return net.out(net.decoder1(net.decoder2(dec, enc1)))


# ------------------------------------------------------------------ memory layout

CHANNELS_LAST = torch.channels_last_3d


def to_network_layout(x: Tensor) -> Tensor:
    """The input in the layout the networks run fastest in on its device: channels-last on CPU only.

    CUDA and MPS keep channels-first: their convolution libraries were not benchmarked here.
    """
    return x.contiguous(memory_format=CHANNELS_LAST) if x.device.type == "cpu" and x.dim() == 5 else x


def volume_from_tokens(tokens: Tensor, like: Tensor) -> Tensor:
    """(batch, voxels, channels) tokens back to ``like``'s (batch, channels, *spatial) shape and layout.

    For a channels-last ``like`` this is a view with canonical channels-last strides (a transposed
    reshape would give a size-1 batch dimension an odd stride, and PyTorch's convolutions then no longer
    recognise the tensor as channels-last); otherwise a channels-first copy, as before.
    """
    batch, channels, *spatial = like.shape
    if like.is_contiguous(memory_format=CHANNELS_LAST) and not like.is_contiguous():
        return tokens.reshape(batch, *spatial, channels).permute(0, 4, 1, 2, 3)
    return tokens.transpose(1, 2).reshape(batch, channels, *spatial)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 5 and x.dtype in (torch.float32, torch.float64) and x.is_contiguous(
        memory_format=CHANNELS_LAST)


class LayoutPreservingInstanceNorm3d(nn.InstanceNorm3d):
    """InstanceNorm3d (without running statistics) whose output keeps a channels-last input channels-last.

    The statistics are those of ``F.instance_norm`` (biased variance, eps inside the square root), computed
    on the (batch, voxels, channels) view: values are first shifted by one voxel of their channel, so the
    float32 sums stay near the spread of the values even when the mean is far larger, then centred and
    squared (two passes; a one-pass ``E[x^2] - E[x]^2`` would cancel catastrophically).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not _is_channels_last(x):
            return super().forward(x)
        batch, channels, *spatial = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(batch, -1, channels)  # a view for channels-last x
        if not torch.is_grad_enabled():
            out = self._normalise_without_grad(tokens)
        else:
            centred = tokens - tokens[:, :1]
            centred -= centred.mean(1, keepdim=True)
            scale = centred.square().mean(1, keepdim=True).add(self.eps).rsqrt()
            if self.weight is not None:
                scale = scale * self.weight
            out = centred * scale  # not in place: square() above keeps ``centred`` for the backward pass
            if self.bias is not None:
                out = out + self.bias
        return out.view(batch, *spatial, channels).permute(0, 4, 1, 2, 3)

    def _normalise_without_grad(self, tokens: Tensor) -> Tensor:
        """The same formula with one full-size allocation, the output (see :func:`.lean_blocks.normalise_centred_`)."""
        return normalise_centred_(tokens - tokens[:, :1], self)


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 Conv3d that runs single-threaded as one matrix product over the voxels of a channels-last input.

    With one thread PyTorch sends 1x1x1 convolutions to a channels-first im2col path that copies a
    channels-last input and returns channels-first (4-17x slower here); with more threads it uses
    oneDNN, which keeps the layout and is faster than the matrix product.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.get_num_threads() > 1 or not _is_channels_last(x):
            return super().forward(x)
        out = F.linear(x.permute(0, 2, 3, 4, 1), self.weight.flatten(1), self.bias)
        return out.permute(0, 4, 1, 2, 3)


def _is_pointwise(conv: nn.Conv3d) -> bool:
    return (conv.kernel_size == (1, 1, 1) and conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1)
            and conv.groups == 1 and conv.padding in ((0, 0, 0), "valid"))


def use_layout_preserving_layers(network: nn.Module) -> None:
    """Retype every plain InstanceNorm3d and pointwise Conv3d of ``network`` in place (see module docstring).

    The subclasses only override ``forward`` and fall back to it for channels-first inputs, so the
    module tree, parameters and keys stay exactly the official ones.
    """
    for module in network.modules():
        if type(module) is nn.InstanceNorm3d and not module.track_running_stats:
            module.__class__ = LayoutPreservingInstanceNorm3d
        elif type(module) is nn.Conv3d and _is_pointwise(module):
            module.__class__ = PointwiseConv3d
