"""Memory-lean inference through the UNETR blocks of SegMamba V1/V2 (docs/benchmarks.md, "Memory").

At full resolution a 128³ window's 48-channel activations are 384 MiB each, and MONAI's block forwards
keep several alive at once (the 96-channel concatenation, the residual, the convolution outputs and the
instance norm's temporaries): most of a window's ~3 GiB peak. Under ``torch.no_grad()`` the functions
here run the same operations on the same values, only

* in an order that lets each activation go as soon as its last use has passed (inputs are handed over
  in one-item lists that the callee empties, so no caller frame keeps them alive);
* with the instance norms applied in place to the convolution outputs they normalise (same formula
  and statistics as :class:`~.segmamba_encoder_decoder.LayoutPreservingInstanceNorm3d`);
* with the up-sampling block's transposed convolution, concatenation and the two convolutions that
  read the concatenation computed slab by slab along the first spatial axis, with exact one-plane halos
  (convolutions are local; the instance norms, which are not, run on whole tensors afterwards), so the
  96-channel concatenation never exists whole.

The low-memory setting (:func:`memory_mode`) goes further at some speed cost: the 3x3x3 convolutions
whose input is dead afterwards overwrite it slab by slab (keeping a copy of the one original plane the
next slab still needs), and the up-sampling block's residual branch overwrites the skip tensor. (The
tri-oriented Mamba, :mod:`.ops.mixers`, and the CPU allocator, ``engine.inference``, have low-memory
steps of their own.)

With gradients enabled (training), or for layers whose structure is not the plain MONAI one, the
modules' own forwards run unchanged. Slab paths run only on CPU channels-last tensors (the layout the
networks use there); elsewhere the whole-tensor operations run in the lean order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetResBlock, UnetrUpBlock
from torch import Tensor, nn

from .ops import low_memory_enabled, memory_mode

__all__ = ["LeanUnetResBlock", "LeanUnetrUpBlock", "normalise_centred_", "low_memory_enabled", "memory_mode",
           "use_lean_blocks"]

#: Bytes of input planes per slab (the slab's temporaries are a few times this).
SLAB_BYTES = 96 * 2**20
#: The instance norm's sum of squares runs over this many chunks of voxels (its temporary is one chunk).
MOMENT_CHUNKS = 8

_CHANNELS_LAST = torch.channels_last_3d


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 5 and x.dtype in (torch.float32, torch.float64) and x.is_contiguous(
        memory_format=_CHANNELS_LAST)


def _slabs_apply(x: Tensor) -> bool:
    return x.device.type == "cpu" and _is_channels_last(x)


# ------------------------------------------------------------------ instance norm


def normalise_centred_(centred: Tensor, norm: nn.Module) -> Tensor:
    """Instance-normalise (batch, voxels, channels) ``centred`` in place; it holds ``tokens - shift``.

    ``shift`` (one voxel per channel) keeps float32 sums near the spread of the values even when the
    mean is far larger. Then the mean is subtracted and the variance is the mean square of the result
    (two passes; a one-pass ``E[x^2] - E[x]^2`` would cancel catastrophically), as in
    :class:`~.segmamba_encoder_decoder.LayoutPreservingInstanceNorm3d`. The squares are summed a few
    large chunks at a time (:data:`MOMENT_CHUNKS`), so the only extra memory is one chunk, and the
    operations stay few and large (many small parallel operations are slow on a busy machine).
    """
    voxels = centred.shape[1]
    centred.sub_(centred.mean(1, keepdim=True))
    step = max(1, -(-voxels // MOMENT_CHUNKS))
    buffer = torch.empty_like(centred[:, :step])
    total = torch.zeros_like(centred[:, :1], dtype=torch.float64)
    for start in range(0, voxels, step):
        part = centred[:, start:start + step]
        total += torch.square(part, out=buffer[:, :part.shape[1]]).sum(1, keepdim=True)
    del buffer
    scale = (total / voxels).to(centred.dtype).add_(norm.eps).rsqrt_()
    if norm.weight is not None:
        scale = scale * norm.weight
    centred.mul_(scale)
    return centred if norm.bias is None else centred.add_(norm.bias)


def _plain_instance_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.InstanceNorm3d) and not norm.track_running_stats


def instance_norm_(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)``, computed in x's own memory when x is channels-last and norm a plain InstanceNorm3d.

    Only for tensors nothing else reads afterwards. Same values as the layout-preserving module.
    """
    if not (_plain_instance_norm(norm) and _is_channels_last(x)) or torch.is_grad_enabled():
        return norm(x)
    batch, channels = x.shape[:2]
    tokens = x.permute(0, 2, 3, 4, 1).reshape(batch, -1, channels)  # a view for channels-last x
    normalise_centred_(tokens.sub_(tokens[:, :1].clone()), norm)
    return x


# ------------------------------------------------------------------ slab convolutions


def _plain_conv(layer: nn.Module) -> nn.Conv3d | None:
    """The Conv3d inside a MONAI ``Convolution`` that holds nothing else (no dropout, norm, activation)."""
    children = list(layer.children()) if not isinstance(layer, nn.Conv3d) else [layer]
    if len(children) != 1 or not isinstance(children[0], nn.Conv3d):
        return None
    conv = children[0]
    if conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) or conv.groups != 1 or isinstance(conv.padding, str):
        return None
    if conv.kernel_size[0] != 2 * conv.padding[0] + 1:  # "same" along the slab axis
        return None
    return conv


def _slab_conv(conv: nn.Conv3d, planes: Tensor) -> Tensor:
    """``conv`` over slab ``planes`` whose halo along the first spatial axis is already in place."""
    if conv.kernel_size == (1, 1, 1):
        return conv(planes)  # the module's own (layout-preserving) path
    return F.conv3d(planes, conv.weight, conv.bias, 1, (0, *conv.padding[1:]))


def _zero_planes(like: Tensor, count: int) -> Tensor:
    return torch.empty((like.shape[0], like.shape[1], count, *like.shape[3:]), dtype=like.dtype,
                       device=like.device, memory_format=_CHANNELS_LAST).zero_()


def _slab_depth(planes_bytes: int) -> int:
    return max(1, SLAB_BYTES // max(1, planes_bytes))


def convs_in_slabs(
    targets: list[tuple[nn.Conv3d, Tensor]], fill: Callable[[int, int, Tensor], None], like: Tensor, channels: int
) -> None:
    """Write ``conv(input)`` into each target's output tensor, building the input slab by slab.

    The input has ``channels`` channels and ``like``'s batch and spatial size; ``fill(lo, hi, dest)``
    writes its planes ``lo:hi`` along the first spatial axis into ``dest``. Each slab is built once, with
    the widest halo any target needs (zero planes beyond the edges: the convolutions' zero padding), and
    each convolution writes its planes of the output. The result is the whole-tensor convolution's.
    """
    batch, _, depth, *plane = like.shape
    halo = max(conv.padding[0] for conv, _ in targets)
    step = _slab_depth(channels * batch * plane[0] * plane[1] * like.element_size())
    for a in range(0, depth, step):
        b = min(a + step, depth)
        lo, hi = max(a - halo, 0), min(b + halo, depth)
        planes = torch.empty((batch, channels, b - a + 2 * halo, *plane), dtype=like.dtype, device=like.device,
                             memory_format=_CHANNELS_LAST)
        first = lo - (a - halo)
        planes[:, :, :first].zero_()
        planes[:, :, first + hi - lo:].zero_()
        fill(lo, hi, planes[:, :, first:first + hi - lo])
        for conv, out in targets:
            h = conv.padding[0]
            out[:, :, a:b].copy_(_slab_conv(conv, planes[:, :, halo - h:planes.shape[2] - (halo - h)]))
        del planes


def conv_in_place(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``conv(x)`` written over x slab by slab (same channels in and out; x must be dead afterwards).

    A slab's output needs one original plane on each side; the plane before has already been
    overwritten, so a copy of it is kept from the previous slab.
    """
    depth, halo = x.shape[2], conv.padding[0]
    step = max(halo, _slab_depth(x[:, :, :1].numel() * x.element_size()))  # kept planes come from one slab
    kept: Tensor | None = None  # the original planes just before the current slab
    for a in range(0, depth, step):
        b = min(a + step, depth)
        hi = min(b + halo, depth)
        parts = [kept if kept is not None else _zero_planes(x, halo)] if halo else []
        parts.append(x[:, :, a:hi])
        if b + halo > hi:
            parts.append(_zero_planes(x, b + halo - hi))
        planes = torch.cat(parts, 2).contiguous(memory_format=_CHANNELS_LAST) if len(parts) > 1 else parts[0]
        out = _slab_conv(conv, planes)
        del planes
        kept = x[:, :, b - halo:b].clone() if halo else None
        x[:, :, a:b].copy_(out)
        del out
    return x


# ------------------------------------------------------------------ MONAI blocks


def _is_plain_res_block(block: nn.Module) -> bool:
    """A MONAI UnetResBlock with stride 1, no dropout and plain instance norms (what SegMamba builds)."""
    if type(block) is not UnetResBlock or _plain_conv(block.conv1) is None or _plain_conv(block.conv2) is None:
        return False
    norms = [block.norm1, block.norm2] + ([block.norm3] if hasattr(block, "norm3") else [])
    if not all(_plain_instance_norm(n) for n in norms):
        return False
    return not hasattr(block, "conv3") or _plain_conv(block.conv3) is not None


def _is_plain_up_block(block: nn.Module) -> bool:
    """A MONAI UnetrUpBlock whose transposed convolution doubles the size (kernel = stride = 2, no padding)."""
    if type(block) is not UnetrUpBlock or not _is_plain_res_block(block.conv_block):
        return False
    children = list(block.transp_conv.children())
    transp = children[0] if len(children) == 1 else None
    return (isinstance(transp, nn.ConvTranspose3d) and transp.kernel_size == transp.stride == (2, 2, 2)
            and transp.padding == transp.output_padding == (0, 0, 0) and transp.groups == 1
            and hasattr(block.conv_block, "conv3"))


class LeanUnetResBlock(UnetResBlock):
    """UnetResBlock whose inference forward keeps fewer full-size tensors alive (module docstring)."""

    def forward(self, inp: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(inp)
        residual = instance_norm_(self.norm3, self.conv3(inp)) if hasattr(self, "conv3") else inp
        return _res_tail(self, [self.conv1(inp), residual])


def _res_tail(block: nn.Module, tensors: list[Tensor]) -> Tensor:
    """norm1, activation, conv2, norm2, + residual, activation: the rest of the block after conv1.

    ``tensors`` holds [conv1 output, residual] and is emptied, so each goes when its last use passes.
    """
    residual = tensors.pop()
    out = block.lrelu(instance_norm_(block.norm1, tensors.pop()))
    conv2 = _plain_conv(block.conv2)
    if low_memory_enabled() and _slabs_apply(out) and conv2 is not None and conv2.in_channels == conv2.out_channels:
        out = conv_in_place(conv2, out)
    else:
        out = block.conv2(out)
    out = instance_norm_(block.norm2, out)
    out += residual
    del residual
    return block.lrelu(out)


class LeanUnetrUpBlock(UnetrUpBlock):
    """UnetrUpBlock that may take its skip in a one-item list, which it empties to free the skip once read.

    On CPU channels-last tensors the concatenation is made one slab at a time for the convolutions that
    read it (module docstring); elsewhere the whole-tensor operations run in the lean order.
    """

    def forward(self, inp: Tensor, skip: Tensor | list[Tensor]) -> Tensor:
        holder = skip if isinstance(skip, list) else [skip]
        if torch.is_grad_enabled():
            return super().forward(inp, holder.pop())
        if not (_slabs_apply(inp) and _slabs_apply(holder[0])):
            up = self.transp_conv(inp)
            cat = torch.cat((up, holder.pop()), dim=1)
            del up
            res = self.conv_block
            residual = instance_norm_(res.norm3, res.conv3(cat))
            tensors = [res.conv1(cat), residual]
            del cat, residual
            return _res_tail(res, tensors)
        return self._slab_forward(inp, holder)

    def _slab_forward(self, low: Tensor, holder: list[Tensor]) -> Tensor:
        res, skip = self.conv_block, holder[0]  # the skip is read through the holder so that clearing it frees it
        conv1, conv3 = _plain_conv(res.conv1), _plain_conv(res.conv3)
        assert conv1 is not None and conv3 is not None

        def fill(lo: int, hi: int, dest: Tensor) -> None:
            """Planes lo:hi of cat(transp_conv(low), skip); plane z of the up-sampled tensor comes from z // 2."""
            first = lo // 2
            up = self.transp_conv(low[:, :, first:(hi + 1) // 2])
            dest[:, :up.shape[1]].copy_(up[:, :, lo - 2 * first:hi - 2 * first])
            dest[:, up.shape[1]:].copy_(holder[0][:, :, lo:hi])

        channels = conv1.in_channels
        out = _empty_like_output(skip, conv1.out_channels)
        if low_memory_enabled() and conv3.out_channels == skip.shape[1]:
            convs_in_slabs([(conv1, out)], fill, skip, channels)
            # the residual branch reads only the planes it writes, so it may overwrite the skip as it goes
            convs_in_slabs([(conv3, skip)], fill, skip, channels)
            residual = skip
        else:
            residual = _empty_like_output(skip, conv3.out_channels)
            convs_in_slabs([(conv1, out), (conv3, residual)], fill, skip, channels)
        del skip
        holder.clear()
        tensors = [out, instance_norm_(res.norm3, residual)]
        del out, residual
        return _res_tail(res, tensors)


def _empty_like_output(like: Tensor, channels: int) -> Tensor:
    return torch.empty((like.shape[0], channels, *like.shape[2:]), dtype=like.dtype, device=like.device,
                       memory_format=_CHANNELS_LAST)


def use_lean_blocks(network: nn.Module) -> None:
    """Retype every plain MONAI UnetResBlock / UnetrUpBlock of ``network`` in place (module docstring).

    Only ``forward`` changes; the module tree, parameters and state-dict keys stay the official ones.
    """
    for module in network.modules():
        if _is_plain_up_block(module):
            module.__class__ = LeanUnetrUpBlock
    for module in network.modules():
        if _is_plain_res_block(module):
            module.__class__ = LeanUnetResBlock
