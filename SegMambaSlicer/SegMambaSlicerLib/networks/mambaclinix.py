"""MambaClinix (CYB08/MambaClinix-PyTorch), re-implemented (docs/models.md, "MambaClinix network").

MambaClinix is an nnU-Net v2 network whose architecture is a function of the dataset's ``plans.json`` and
``dataset.json``. :func:`mambaclinix_from_plans` builds it the way the official trainer
(``nnUNetTrainerMambaClinix.build_network_architecture``) does; :class:`MambaClinix` can also be built
directly from the resolved hyper-parameters.

Keys: the official model keeps a reference to its encoder inside the decoder and uses
dynamic-network-architectures (dna) blocks, whose ``all_modules`` Sequential re-lists every conv/norm.
Both quirks are reproduced here (same dna blocks, same encoder reference), so ``state_dict()`` has exactly
the official entries, aliases included, and an nnU-Net ``checkpoint_final.pth["network_weights"]`` loads
with ``strict=True`` as it is.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import (
    ConvDropoutNormReLU,
    StackedConvBlocks,
)
from torch import nn

from SegMambaSlicerLib.errors import InputImageError, ModelCardError
from SegMambaSlicerLib.networks.ops.mixers import Mamba

Kernel = Sequence[int]

#: nnU-Net's fixed choices for MambaClinix (conv bias on, affine InstanceNorm, LeakyReLU 0.01, no dropout).
NORM_KWARGS: dict[str, Any] = {"eps": 1e-5, "affine": True}
NONLIN_KWARGS: dict[str, Any] = {"inplace": True}
#: The same choices as keyword arguments of dna's conv / residual blocks.
DNA_OPS: dict[str, Any] = {
    "conv_bias": True,
    "norm_op": nn.InstanceNorm3d,
    "norm_op_kwargs": NORM_KWARGS,
    "nonlin": nn.LeakyReLU,
    "nonlin_kwargs": NONLIN_KWARGS,
}
#: Encoder stage values after the official rewrite: 2 selects an HGCN block, 1 a Mamba layer.
HGCN_STAGE, MAMBA_STAGE = 2, 1


class PlansError(ModelCardError):
    """An nnU-Net ``plans.json`` / ``dataset.json`` cannot describe a MambaClinix network."""


def _conv_unit(cin: int, cout: int, kernel: Kernel | int, act: bool) -> ConvDropoutNormReLU:
    """dna conv unit without norm (stride 1, bias), so keys carry the official ``conv`` / ``all_modules`` aliases."""
    nonlin = {"nonlin": nn.LeakyReLU, "nonlin_kwargs": NONLIN_KWARGS} if act else {}
    return ConvDropoutNormReLU(nn.Conv3d, cin, cout, kernel, 1, conv_bias=True, **nonlin)


def _same_padding(kernel: Kernel) -> list[int]:
    return [(k - 1) // 2 for k in kernel]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis at every voxel (eps 1e-6, parameters ``gamma``/``beta``)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return self.gamma.view(shape) * x + self.beta.view(shape)


class HgConv(nn.Module):
    """High-order gated convolution (``hgConvs``): recursive 1×1 convs fed by depthwise-conv features.

    Despite the name every combination is an addition (docs/models.md, "MambaClinix network"); channels
    split in ascending order ``dims = (C/2^(o-1), ..., C/2, C)``.
    """

    def __init__(self, dim: int, order: int, kernel: Kernel) -> None:
        super().__init__()
        self.dims = [dim // 2**i for i in range(order)][::-1]
        depthwise = sum(self.dims)
        self.proj_in = nn.Conv3d(dim, 2 * dim, 1)
        self.dwconv = nn.Conv3d(
            depthwise, depthwise, list(kernel), padding=_same_padding(kernel), groups=depthwise
        )
        self.reconv = nn.ModuleList(nn.Conv3d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1))
        self.proj_out = nn.Conv3d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head, rest = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        gates = torch.split(self.dwconv(rest), self.dims, dim=1)
        x = head + gates[0]
        for reconv, gate in zip(self.reconv, gates[1:]):
            x = reconv(x) + gate
        return self.proj_out(x)


class HGCNBlock(nn.Module):
    """HGCN_BLOCK: 1×1 reduce to C/2, layer-scaled hgConv residual, two k-convs back to C, + input.

    Drop-path is omitted: it is the identity at inference, the only mode this package runs.
    """

    def __init__(self, channels: int, kernel: Kernel, order: int) -> None:
        super().__init__()
        inner = channels // 2
        self.gamma1 = nn.Parameter(torch.full((inner,), 1e-6))
        self.hgConvs = HgConv(inner, order, kernel)
        self.lynorm1 = ChannelLayerNorm(inner)
        self.lynorm2 = ChannelLayerNorm(inner)
        self.transconv = _conv_unit(channels, inner, 1, act=False)
        self.conv1 = _conv_unit(inner, channels, kernel, act=True)
        self.conv2 = _conv_unit(channels, channels, kernel, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.transconv(x)
        scale = self.gamma1.view(1, -1, *([1] * (y.ndim - 2)))
        y = y + scale * self.hgConvs(self.lynorm1(y))
        return x + self.conv2(self.conv1(self.lynorm2(y)))


class MambaLayer(nn.Module):
    """Flatten → LayerNorm → Mamba → the *same* LayerNorm → Linear → reshape, + input; never in half precision.

    ``skip_scale`` is never used but is part of the official state dict.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            batch, channels, *spatial = x.shape
            tokens = x.reshape(batch, channels, -1).transpose(1, 2)
            out = self.proj(self.norm(self.mamba(self.norm(tokens))))
            return out.transpose(1, 2).reshape(batch, channels, *spatial) + x


class ResidualMambaEncoder(nn.Module):
    """Stem, then per stage one residual block (BasicBlockD) followed by an HGCN block or a Mamba layer.

    The channel LayerNorm sits between the residual block and the HGCN block of stage ``conn_pos``.
    Attribute order (stem, LayerNorm, encoder_layers, stages) is the official state-dict order.
    """

    def __init__(
        self,
        input_channels: int,
        features: Sequence[int],
        kernel_sizes: Sequence[Kernel],
        strides: Sequence[Kernel],
        stage_types: Sequence[int],
    ) -> None:
        super().__init__()
        self.conn_pos = max(s for s, kind in enumerate(stage_types) if kind == HGCN_STAGE)
        self.stem = StackedConvBlocks(
            1, nn.Conv3d, input_channels, features[0], kernel_sizes[0], 1, **DNA_OPS
        )
        self.LayerNorm = ChannelLayerNorm(features[self.conn_pos])
        self.encoder_layers = nn.ModuleList(
            HGCNBlock(features[s], kernel_sizes[s], order=s + 2)
            if kind == HGCN_STAGE
            else MambaLayer(features[s])
            for s, kind in enumerate(stage_types)
        )
        in_features = [features[0], *features[:-1]]
        self.stages = nn.ModuleList(
            StackedResidualBlocks(1, nn.Conv3d, cin, cout, kernel, stride, block=BasicBlockD, **DNA_OPS)
            for cin, cout, kernel, stride in zip(in_features, features, kernel_sizes, strides)
        )
        self.features = list(features)
        self.kernel_sizes = [list(k) for k in kernel_sizes]
        self.strides = [list(s) for s in strides]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for s, (stage, layer) in enumerate(zip(self.stages, self.encoder_layers)):
            x = stage(x)
            if s == self.conn_pos:
                x = self.LayerNorm(x)
            x = layer(x)
            skips.append(x)
        return skips


class UpsampleLayer(nn.Module):
    """Nearest-neighbour upsampling by the stage stride, then a 1×1×1 conv (bias) to the skip's width."""

    def __init__(self, cin: int, cout: int, scale: Kernel) -> None:
        super().__init__()
        self.scale = tuple(float(s) for s in scale)
        self.conv = nn.Conv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class BasicResBlock(nn.Module):
    """Decoder stage (2F→F): conv-IN-LReLU-conv-IN plus a 1×1×1 projection of the input, then LReLU."""

    def __init__(self, cin: int, cout: int, kernel: Kernel) -> None:
        super().__init__()
        padding = [k // 2 for k in kernel]
        self.conv1 = nn.Conv3d(cin, cout, list(kernel), padding=padding)
        self.norm1 = nn.InstanceNorm3d(cout, **NORM_KWARGS)
        self.act1 = nn.LeakyReLU(**NONLIN_KWARGS)
        self.conv2 = nn.Conv3d(cout, cout, list(kernel), padding=padding)
        self.norm2 = nn.InstanceNorm3d(cout, **NORM_KWARGS)
        self.act2 = nn.LeakyReLU(**NONLIN_KWARGS)
        self.conv3 = nn.Conv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + self.conv3(x))


class UNetResDecoder(nn.Module):
    """Residual decoder; ``deep_supervision`` is read at call time, as nnU-Net's predictor switches it off.

    ``self.encoder`` is only a reference (it is what puts the official ``decoder.encoder.*`` aliases
    into the state dict); it is not called here.
    """

    def __init__(self, encoder: ResidualMambaEncoder, num_classes: int, deep_supervision: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.deep_supervision = deep_supervision
        feats, kernels, strides = encoder.features, encoder.kernel_sizes, encoder.strides
        n = len(feats)
        self.Init_Residual = _basic_block(feats[-1], feats[-1], kernels[-1])
        skip_stages = range(n - 2, -1, -1)  # decoder stage j works on encoder skip n-2-j
        self.residual_blocks = nn.ModuleList(
            _basic_block(feats[s], feats[s], kernels[s]) for s in skip_stages
        )
        self.stages = nn.ModuleList(BasicResBlock(2 * feats[s], feats[s], kernels[s]) for s in skip_stages)
        self.upsample_layers = nn.ModuleList(
            UpsampleLayer(feats[s + 1], feats[s], strides[s + 1]) for s in skip_stages
        )
        self.seg_layers = nn.ModuleList(nn.Conv3d(feats[s], num_classes, 1) for s in skip_stages)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = self.Init_Residual(skips[-1])
        outputs = []
        for j, (up, residual, stage, seg) in enumerate(
            zip(self.upsample_layers, self.residual_blocks, self.stages, self.seg_layers)
        ):
            x = stage(torch.cat([up(x), residual(skips[-(j + 2)])], dim=1))
            if self.deep_supervision:
                outputs.append(seg(x))
        if not self.deep_supervision:
            return self.seg_layers[-1](x)
        return outputs[::-1]


def _basic_block(cin: int, cout: int, kernel: Kernel) -> BasicBlockD:
    return BasicBlockD(nn.Conv3d, cin, cout, kernel, 1, **DNA_OPS)


class MambaClinix(nn.Module):
    """The MambaClinix network from resolved hyper-parameters.

    ``stage_types`` is the per-stage value *after* the official rewrite (see :func:`mambaclinix_stage_types`):
    2 = HGCN block (order = stage index + 2), 1 = Mamba layer. With ``deep_supervision`` the forward returns
    one logit map per decoder stage, highest resolution first; otherwise only the highest-resolution map.
    """

    def __init__(
        self,
        input_channels: int,
        features_per_stage: Sequence[int],
        kernel_sizes: Sequence[Kernel],
        strides: Sequence[Kernel],
        stage_types: Sequence[int],
        num_classes: int,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        _check_architecture(features_per_stage, kernel_sizes, strides, stage_types)
        self.encoder = ResidualMambaEncoder(
            input_channels, features_per_stage, kernel_sizes, strides, stage_types
        )
        self.decoder = UNetResDecoder(self.encoder, num_classes, deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        multiple = [math.prod(axis) for axis in zip(*self.encoder.strides)]
        if any(size % m for size, m in zip(x.shape[2:], multiple)):
            raise InputImageError(
                f"This MambaClinix needs spatial sizes divisible by {tuple(multiple)} (its pooling strides); "
                f"got {tuple(x.shape[2:])}."
            )
        return self.decoder(self.encoder(x))


def mambaclinix_stage_types(n_conv_per_stage_encoder: Sequence[int]) -> list[int]:
    """The official stage-type rule: stages ``s >= ceil(n/2)`` are set to 1, the rest keep the plans value.

    Upstream rewrites the plans list in place, so a ``plans.json`` saved after training may already hold
    the rewritten values; the rule is idempotent, so both forms give the same network. We work on a copy
    and leave the caller's plans untouched.
    """
    types = list(n_conv_per_stage_encoder)
    for s in range(math.ceil(len(types) / 2), len(types)):
        types[s] = MAMBA_STAGE
    return types


def resolve_configuration(plans: Mapping[str, Any], configuration: str) -> dict[str, Any]:
    """A plans configuration with nnU-Net's ``inherits_from`` chain applied (child keys win)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, Mapping):
        raise PlansError("plans.json has no 'configurations' section; is this an nnU-Net v2 plans file?")
    chain: list[str] = []
    name: str | None = configuration
    resolved: dict[str, Any] = {}
    while name is not None:
        if name in chain:
            raise PlansError(f"plans.json configurations inherit in a circle: {' -> '.join([*chain, name])}.")
        if name not in configurations:
            known = ", ".join(sorted(configurations))
            raise PlansError(f"plans.json has no configuration {name!r}; it has: {known}.")
        chain.append(name)
        entry = configurations[name]
        resolved = {**copy.deepcopy(dict(entry)), **resolved}
        name = entry.get("inherits_from")
    return resolved


def num_segmentation_heads(dataset_json: Mapping[str, Any]) -> int:
    """Output channels as nnU-Net's LabelManager counts them.

    Label-based datasets: the distinct label values (background included, ``ignore`` excluded).
    Region-based datasets (some label maps to a list of several values): the regions, without background
    and ``ignore``.
    """
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise PlansError("dataset.json has no 'labels' mapping, so the number of output classes is unknown.")
    entries = {name: value for name, value in labels.items() if name != "ignore"}
    if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in entries.values()):
        return sum(1 for v in entries.values() if set(_as_ints(v)) != {0})
    return len({i for v in entries.values() for i in _as_ints(v)})


def _as_ints(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def num_input_channels_of(dataset_json: Mapping[str, Any]) -> int:
    """Input channels as nnU-Net counts them (``channel_names``, or the older ``modality``)."""
    for key in ("channel_names", "modality"):
        if isinstance(dataset_json.get(key), Mapping):
            return len(dataset_json[key])
    raise PlansError(
        "dataset.json has neither 'channel_names' nor 'modality', so the input channels are unknown."
    )


def mambaclinix_from_plans(
    plans: Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    configuration: str = "3d_fullres",
    num_input_channels: int | None = None,
    deep_supervision: bool = False,
) -> MambaClinix:
    """Build MambaClinix as ``nnUNetTrainerMambaClinix.build_network_architecture`` does.

    Deep supervision defaults to off, which is what nnU-Net inference uses (only the highest-resolution
    output); it does not change the state-dict keys.
    """
    config = resolve_configuration(plans, configuration)
    required = (
        "conv_kernel_sizes",
        "pool_op_kernel_sizes",
        "UNet_base_num_features",
        "unet_max_num_features",
        "n_conv_per_stage_encoder",
        "n_conv_per_stage_decoder",
    )
    missing = [key for key in required if key not in config]
    if missing:
        raise PlansError(
            f"plans.json configuration {configuration!r} lacks {', '.join(missing)}; MambaClinix needs "
            "nnU-Net v2.1-style plans (the format written by the MambaClinix nnU-Net fork)."
        )
    kernels = [list(k) for k in config["conv_kernel_sizes"]]
    n_stages = len(kernels)
    if len(config["n_conv_per_stage_decoder"]) != n_stages - 1:
        raise PlansError(
            f"plans.json: n_conv_per_stage_decoder needs {n_stages - 1} entries for {n_stages} stages, "
            f"got {len(config['n_conv_per_stage_decoder'])}."
        )
    base, cap = int(config["UNet_base_num_features"]), int(config["unet_max_num_features"])
    if num_input_channels is None:
        num_input_channels = num_input_channels_of(dataset_json)
    return MambaClinix(
        input_channels=num_input_channels,
        features_per_stage=[min(base * 2**s, cap) for s in range(n_stages)],
        kernel_sizes=kernels,
        strides=[list(s) for s in config["pool_op_kernel_sizes"]],
        stage_types=mambaclinix_stage_types(config["n_conv_per_stage_encoder"]),
        num_classes=num_segmentation_heads(dataset_json),
        deep_supervision=deep_supervision,
    )


def _check_architecture(
    features: Sequence[int], kernels: Sequence[Kernel], strides: Sequence[Kernel], stage_types: Sequence[int]
) -> None:
    """Reject what the official code cannot build, naming the offending plans entry."""
    n = len(features)
    if n < 2 or len(kernels) != n or len(strides) != n or len(stage_types) != n:
        raise PlansError(
            f"MambaClinix needs ≥2 stages and one kernel, stride and stage entry per stage; got {n} features, "
            f"{len(kernels)} kernels, {len(strides)} strides, {len(stage_types)} stage entries."
        )
    if any(len(k) != 3 for k in [*kernels, *strides]):
        raise PlansError("MambaClinix is 3-D only: every conv kernel and pooling stride needs 3 entries.")
    bad = [(s, t) for s, t in enumerate(stage_types) if t not in (HGCN_STAGE, MAMBA_STAGE)]
    if bad:
        raise PlansError(
            f"n_conv_per_stage_encoder must be 2 (HGCN) or 1 (Mamba) in the shallow stages; stage {bad[0][0]} "
            f"has {bad[0][1]}. The official MambaClinix builds no layer for other values."
        )
    if HGCN_STAGE not in stage_types:
        raise PlansError("MambaClinix needs at least one HGCN stage (n_conv_per_stage_encoder value 2).")
    for s, kind in enumerate(stage_types):
        inner, order = features[s] // 2, s + 2
        if kind == HGCN_STAGE and (features[s] % 2 or inner % 2 ** (order - 1)):
            raise PlansError(
                f"Stage {s} has {features[s]} features; its HGCN block (order {order}) needs a multiple of "
                f"{2**order}."
            )
