"""Network modules: backbones, cosine heads and the multi-expert ``ExpertNet``.

Every estimator trains an :class:`ExpertNet`: a shared trunk, ``K`` expert branches and
``K`` heads; ``forward`` returns logits of shape ``(B, K, C)``. A single-expert model
(``K = 1``) is an ordinary classifier. The module knows nothing about estimators.

Backbones
---------
``"mlp"``
    Trunk: ``Linear -> BatchNorm1d -> ReLU -> Dropout`` per hidden size; each expert adds
    its own MLP (``expert_hidden_sizes``).
``"convnet"``
    For small images (e.g. 28x28 digits): a shared two-block CNN, then per expert one
    convolutional block, average pooling to a 3x3 map, flattening and a hidden layer.
``"resnet32"``
    CIFAR ResNet-32 (He et al. 2016, "option A" shortcuts, as in LDAM-DRW and RIDE):
    shared stem + layer1; each expert owns layer2 and layer3 (widths 32/64, or 24/48
    with ``reduce_dimension=True`` as in RIDE) and global average pooling.
``"resnet50"``, ``"resnext50"``
    ImageNet ResNet-50 and ResNeXt-50 (32x4d) in torchvision's layout, split as RIDE's
    ImageNet-LT / iNaturalist models: shared stem, layer1 and layer2; each expert owns
    layer3 and layer4 (planes 256/512, or 192/384 with ``reduce_dimension=True``, i.e.
    2048- or 1536-d features) and global average pooling. The shared trunk's
    parameter names are torchvision's (``conv1``, ``bn1``, ``layer1``, ``layer2``), so
    torchvision weights load into it (see :meth:`ExpertNet.load_trunk_weights`).
an ``nn.Module``
    A user trunk mapping inputs to features (flattened if needed); each expert adds an
    MLP (``expert_hidden_sizes``) on top.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "count_macs",
    "ConvNetBranch",
    "ConvNetTrunk",
    "ExpertNet",
    "MLP",
    "NormedLinear",
    "ResNet32Branch",
    "ResNet32Trunk",
    "ResNetBranch",
    "ResNetTrunk",
    "resolve_backbone",
]

BACKBONES = ("auto", "mlp", "convnet", "resnet32", "resnet50", "resnext50")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                     groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class NormedLinear(nn.Module):
    """Cosine classifier: ``scale * <x / |x|, w_c / |w_c|>`` for every class ``c``.

    The LDAM-DRW / RIDE head (no bias). Weights are initialised uniform in (-1, 1) and
    each class column is rescaled to unit norm, as in the official code.

    Parameters
    ----------
    in_features : int
        Size of the input features.
    out_features : int
        Number of classes.
    scale : float, default=1.0
        Multiplier ``s`` of the cosine (RIDE uses 30, applied inside the network).
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"scale={self.scale}"


class MLP(nn.Sequential):
    """``Linear -> BatchNorm1d -> ReLU -> Dropout`` for each hidden size.

    Parameters
    ----------
    in_features : int
        Input size.
    hidden_sizes : sequence of int
        Width of each layer; empty means the identity.
    dropout : float, default=0.0
        Dropout probability after each activation.
    batch_norm : bool, default=True
        Whether to normalise each hidden layer.
    """

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], dropout: float = 0.0,
                 batch_norm: bool = True) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        super().__init__(*layers)
        self.out_features = width


class _ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: subsample by 2 and zero-pad channels."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block (conv-BN-ReLU-conv-BN + shortcut, ReLU)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA((planes - in_planes) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = []
    for block_stride in [stride] + [1] * (blocks - 1):
        layers.append(BasicBlock(in_planes, planes, block_stride))
        in_planes = planes * BasicBlock.expansion
    return nn.Sequential(*layers)


def _kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal init of every Conv2d and Linear (LDAM-DRW's ``_weights_init``)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)


class ResNet32Trunk(nn.Module):
    """Shared part of ResNet-32: stem (3x3 conv to 16 channels) and layer1 (5 blocks)."""

    def __init__(self, in_channels: int = 3, blocks: int = 5) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _make_stage(16, 16, blocks, stride=1)
        self.out_channels = 16
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(F.relu(self.bn1(self.conv1(x))))


class ResNet32Branch(nn.Module):
    """One expert of ResNet-32: layer2 and layer3 (5 blocks each), global average pool.

    Parameters
    ----------
    in_channels : int, default=16
        Channels coming out of the shared trunk.
    widths : tuple of int, default=(32, 64)
        Channels of layer2 and layer3; RIDE's ``reduce_dimension`` uses (24, 48).
    blocks : int, default=5
        Blocks per stage (5 makes ResNet-32).
    """

    def __init__(self, in_channels: int = 16, widths: tuple[int, int] = (32, 64),
                 blocks: int = 5) -> None:
        super().__init__()
        self.layer2 = _make_stage(in_channels, widths[0], blocks, stride=2)
        self.layer3 = _make_stage(widths[0], widths[1], blocks, stride=2)
        self.out_features = widths[1]
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.layer3(self.layer2(x)), 1).flatten(1)


class ConvNetTrunk(nn.Module):
    """Shared part of the small ConvNet: two conv-BN-ReLU-maxpool blocks (32, 64)."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            conv3x3(widths[0], widths[1]), nn.BatchNorm2d(widths[1]), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.out_channels = widths[1]
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ConvNetBranch(nn.Module):
    """One expert of the small ConvNet: conv-BN-ReLU, average pooling to a
    ``pool_size`` x ``pool_size`` map, then a hidden fully connected layer (``hidden``
    units, ReLU) before the head.

    The hidden layer is what a plain two-block CNN has and the pooled 64 channels alone
    lack. Issue 15 measured the branch without it at 61.9 % (cross-entropy) / 82.2 %
    (logit-adjusted) on MNIST-LT over 3 seeds, 30 epochs, against 81.9 / 90.3 for a plain
    CNN. The 3 x 3 pooled map keeps the coarse layout that a global average discards (a
    plain CNN flattens its whole map). Chosen on a validation split (20 % of each class
    of ``load_mnist_lt(random_state=s).X_train``, s = 0, 1, 2; the test split unused;
    30 epochs, each method's defaults, 2-core CPU), balanced accuracy with a global
    average (``pool_size=1``) -> 3 x 3: cross-entropy 80.2 -> 86.5, logit-adjusted 92.3
    -> 94.8, DQRoute 92.6 -> 96.4, RIDE with every expert 95.9 -> 94.2 (the mean over
    the four 90.3 -> 93.0). ``hidden=0, pool_size=1`` gives the first branch.

    Parameters
    ----------
    in_channels : int, default=64
        Channels of the trunk's output.
    width : int, default=64
        Channels of the branch's convolution.
    hidden : int, default=128
        Units of the hidden layer (0: none, the pooled features go to the head).
    pool_size : int, default=3
        Side of the average-pooled map (1: global average pooling).
    """

    def __init__(self, in_channels: int = 64, width: int = 64, hidden: int = 128,
                 pool_size: int = 3) -> None:
        super().__init__()
        self.block = nn.Sequential(conv3x3(in_channels, width), nn.BatchNorm2d(width),
                                   nn.ReLU(inplace=True))
        self.pool_size = pool_size
        pooled = width * pool_size * pool_size
        self.fc = (nn.Sequential(nn.Linear(pooled, hidden), nn.ReLU(inplace=True))
                   if hidden else nn.Identity())
        self.out_features = hidden or pooled
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.block(x), self.pool_size).flatten(1))


class Bottleneck(nn.Module):
    """ImageNet ResNet bottleneck: 1x1 - 3x3 (stride, groups) - 1x1, BN after each, shortcut.

    torchvision's block (stride on the 3x3 convolution, "ResNet v1.5"), also RIDE's
    ImageNet-LT block. The inner width is ``int(planes * base_width / 64) * groups``
    (ResNeXt-50 32x4d: ``groups=32, base_width=4``); the output has ``4 * planes``
    channels.

    Parameters
    ----------
    inplanes : int
        Input channels.
    planes : int
        Output channels divided by ``expansion`` (4).
    stride : int, default=1
        Stride of the 3x3 convolution.
    downsample : torch.nn.Module or None, default=None
        Projection of the input for the shortcut (1x1 convolution + BN) when the shape
        changes; ``None`` is the identity.
    groups : int, default=1
        Groups of the 3x3 convolution (ResNeXt's cardinality).
    base_width : int, default=64
        Width per group at ``planes=64``.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1,
                 base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_bottleneck_stage(inplanes: int, planes: int, blocks: int, stride: int, *,
                           groups: int, base_width: int) -> nn.Sequential:
    """``blocks`` bottlenecks; the first changes stride/width through a 1x1 projection."""
    downsample = None
    if stride != 1 or inplanes != planes * Bottleneck.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * Bottleneck.expansion, stride),
                                   nn.BatchNorm2d(planes * Bottleneck.expansion))
    layers = [Bottleneck(inplanes, planes, stride, downsample, groups, base_width)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes, groups=groups,
                          base_width=base_width) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _resnet_init(module: nn.Module) -> None:
    """RIDE's ImageNet init: conv weights ``N(0, 2 / (k^2 out_channels))`` (He et al.,
    fan-out), BatchNorm ``gamma = 1, beta = 0``; linear layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


#: ``(groups, width per group)`` of the named ImageNet backbones.
_RESNET_VARIANTS = {"resnet50": (1, 64), "resnext50": (32, 4)}


class ResNetTrunk(nn.Module):
    """Shared part of ResNet-50 / ResNeXt-50: stem, layer1 (3 blocks), layer2 (4 blocks).

    Stem: 7x7 convolution with stride 2 to 64 channels, BN, ReLU, 3x3 max-pool with
    stride 2. Parameter names are torchvision's, so the ``conv1``, ``bn1``, ``layer1``
    and ``layer2`` entries of a torchvision ``resnet50`` / ``resnext50_32x4d``
    state_dict load into it unchanged. Output: 512 channels at 1/8 of the input size.

    Parameters
    ----------
    in_channels : int, default=3
        Channels of the input images.
    groups : int, default=1
        Groups of the 3x3 convolutions (32 for ResNeXt-50 32x4d).
    width_per_group : int, default=64
        Width per group (4 for ResNeXt-50 32x4d).
    """

    def __init__(self, in_channels: int = 3, groups: int = 1, width_per_group: int = 64
                 ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stage = {"groups": groups, "base_width": width_per_group}
        self.layer1 = _make_bottleneck_stage(64, 64, 3, stride=1, **stage)
        self.layer2 = _make_bottleneck_stage(256, 128, 4, stride=2, **stage)
        self.out_channels = 128 * Bottleneck.expansion
        _resnet_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer2(self.layer1(x))


class ResNetBranch(nn.Module):
    """One expert of ResNet-50 / ResNeXt-50: layer3 (6 blocks), layer4 (3 blocks), pool.

    Both stages start with stride 2. RIDE's ``reduce_dimension`` uses planes (192, 384)
    instead of (256, 512), giving 1536-d instead of 2048-d features. Global average
    pooling is adaptive: on 224x224 inputs it equals the papers' 7x7 average pool, and
    smaller images work too.

    Parameters
    ----------
    in_channels : int, default=512
        Channels coming out of the shared trunk.
    planes : tuple of int, default=(256, 512)
        Planes of layer3 and layer4 (output channels are 4 times larger).
    groups : int, default=1
        Groups of the 3x3 convolutions (32 for ResNeXt-50 32x4d).
    width_per_group : int, default=64
        Width per group (4 for ResNeXt-50 32x4d).
    """

    def __init__(self, in_channels: int = 512, planes: tuple[int, int] = (256, 512),
                 groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        stage = {"groups": groups, "base_width": width_per_group}
        self.layer3 = _make_bottleneck_stage(in_channels, planes[0], 6, stride=2, **stage)
        self.layer4 = _make_bottleneck_stage(planes[0] * Bottleneck.expansion, planes[1], 3,
                                             stride=2, **stage)
        self.out_features = planes[1] * Bottleneck.expansion
        _resnet_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.layer4(self.layer3(x)), 1).flatten(1)


class _FlattenedTrunk(nn.Module):
    """Wraps a user trunk so that its output is a (B, D) matrix."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).flatten(1)


def resolve_backbone(backbone: str | nn.Module, input_shape: Sequence[int]) -> str | nn.Module:
    """Resolve ``backbone="auto"`` from the input shape (one sample, without batch axis).

    ``"auto"`` picks ``"mlp"`` for feature vectors, ``"resnet32"`` for images with 3
    channels and sides of at least 32 pixels (CIFAR-shaped) and ``"convnet"`` for other
    images.
    """
    if not isinstance(backbone, str):
        return backbone
    if backbone != "auto":
        return backbone
    if len(input_shape) == 1:
        return "mlp"
    channels, height, width = input_shape
    return "resnet32" if channels == 3 and min(height, width) >= 32 else "convnet"


def _trunk_output_shape(trunk: nn.Module, input_shape: Sequence[int]) -> torch.Size:
    """Shape of one trunk output (without batch axis) from a dry run in eval mode."""
    was_training = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            param = next(iter(trunk.parameters()), None)
            device = param.device if param is not None else None
            out = trunk(torch.zeros(2, *input_shape, device=device))
    finally:
        trunk.train(was_training)
    return out.shape[1:]


def _build_backbone(
    backbone: str | nn.Module,
    input_shape: Sequence[int],
    *,
    hidden_sizes: Sequence[int],
    expert_hidden_sizes: Sequence[int],
    dropout: float,
    reduce_dimension: bool,
) -> tuple[nn.Module, Callable[[], nn.Module]]:
    """Return the shared trunk and a factory building one expert branch."""
    if isinstance(backbone, str) and backbone not in BACKBONES[1:]:
        raise ValueError(f"backbone={backbone!r} is not supported; expected one of {BACKBONES} "
                         "or a torch.nn.Module trunk.")
    if isinstance(backbone, nn.Module):
        trunk: nn.Module = _FlattenedTrunk(copy.deepcopy(backbone))
        width = int(torch.Size(_trunk_output_shape(trunk, input_shape)).numel())
        return trunk, lambda: MLP(width, expert_hidden_sizes, dropout)
    if backbone == "mlp":
        if len(input_shape) != 1:
            raise ValueError(f"backbone='mlp' needs feature vectors (2-D X), got samples of "
                             f"shape {tuple(input_shape)}; use 'convnet' or 'resnet32'.")
        trunk = MLP(input_shape[0], hidden_sizes, dropout)
        width = trunk.out_features
        return trunk, lambda: MLP(width, expert_hidden_sizes, dropout)
    if len(input_shape) != 3:
        raise ValueError(f"backbone={backbone!r} needs images of shape (N, C, H, W), got "
                         f"samples of shape {tuple(input_shape)}; use backbone='mlp'.")
    if backbone == "convnet":
        trunk = ConvNetTrunk(input_shape[0])
        return trunk, lambda: ConvNetBranch(trunk.out_channels)
    if backbone in _RESNET_VARIANTS:
        groups, width_per_group = _RESNET_VARIANTS[backbone]
        planes = (192, 384) if reduce_dimension else (256, 512)
        trunk = ResNetTrunk(input_shape[0], groups, width_per_group)
        return trunk, lambda: ResNetBranch(trunk.out_channels, planes, groups, width_per_group)
    widths = (24, 48) if reduce_dimension else (32, 64)
    return ResNet32Trunk(input_shape[0]), lambda: ResNet32Branch(16, widths)


def _read_state_dict(weights: str | os.PathLike | Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """The state_dict in ``weights`` (a mapping, or a file written by ``torch.save``)."""
    if isinstance(weights, Mapping):
        state = weights
    else:
        path = Path(os.fspath(weights)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"backbone_weights file {str(path)!r} does not exist (a "
                                    "local file written by torch.save(state_dict, path) is "
                                    "expected; ltroute never downloads weights).")
        try:
            # weights_only: tensors and containers only, never code from the file.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
            raise ValueError(f"backbone_weights file {str(path)!r} could not be read as a "
                             f"state_dict by torch.load(weights_only=True): {error}") from error
    if not isinstance(state, Mapping) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor)
            for key, value in state.items()):
        nested = [key for key, value in state.items() if isinstance(value, Mapping)] \
            if isinstance(state, Mapping) else []
        hint = (f" It holds the mapping(s) {nested[:3]}: a checkpoint? Save the state_dict "
                "itself." if nested else "")
        raise ValueError("backbone_weights must be a state_dict, a mapping of parameter "
                         f"names to tensors; got {type(state).__name__}.{hint}")
    return dict(state)


def _check_trunk_state_dict(state: Mapping[str, torch.Tensor],
                            expected: Mapping[str, torch.Tensor]) -> None:
    """Raise a ``ValueError`` naming the differences between ``state`` and ``expected``."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} trunk entries are missing ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} entries are not in the trunk "
                         f"({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
        hint = ""
        prefixed = [key for key in state if missing and key.endswith("." + missing[0])]
        roots = sorted({key.split(".")[0] for key in expected})
        if prefixed:
            prefix = prefixed[0][: -len(missing[0])]
            hint = f" The file's names carry the prefix {prefix!r}: strip it."
        elif unexpected and not missing:
            hint = (" Only the entries under " + ", ".join(roots) + " belong to the trunk "
                    "(e.g. a whole torchvision network was saved): keep those, "
                    "{k: v for k, v in state.items() if k.split('.')[0] in {"
                    + ", ".join(repr(r) for r in roots) + "}}.")
        raise ValueError("backbone_weights do not match the trunk: " + "; ".join(parts)
                         + "." + hint)
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(f"backbone_weights entry {key!r} has shape "
                             f"{tuple(state[key].shape)}, but the trunk's has shape "
                             f"{tuple(tensor.shape)} (another architecture or number of "
                             "input channels?).")


class ExpertNet(nn.Module):
    """Shared trunk, ``n_experts`` branches and heads; ``forward`` returns (B, K, C).

    Parameters
    ----------
    input_shape : sequence of int
        Shape of one sample: ``(n_features,)`` or ``(channels, height, width)``.
    n_classes : int
        Number of classes ``C``.
    n_experts : int, default=1
        Number of experts ``K``.
    backbone : {"auto", "mlp", "convnet", "resnet32", "resnet50", "resnext50"} or \
torch.nn.Module, default="auto"
        See the module docstring; a module instance is deep-copied.
    hidden_sizes : sequence of int, default=(256, 256)
        Trunk widths of the MLP backbone.
    expert_hidden_sizes : sequence of int, default=(128,)
        Widths of each expert's MLP branch (MLP and user backbones).
    cosine_head : bool, default=False
        Cosine classifier (:class:`NormedLinear` times ``head_scale``) instead of a
        linear layer with bias.
    head_scale : float, default=30.0
        Scale ``s`` of the cosine head (ignored by linear heads).
    reduce_dimension : bool, default=False
        RIDE's narrower experts: ResNet-32 widths (24, 48) instead of (32, 64);
        ResNet-50 / ResNeXt-50 planes (192, 384) instead of (256, 512).
    dropout : float, default=0.0
        Dropout after each MLP activation.
    backbone_weights : str, path-like, mapping or None, default=None
        A state_dict for the shared trunk, or the path of a file written by
        ``torch.save(state_dict, path)``; loaded by :meth:`load_trunk_weights` after
        the network is built (the experts and heads keep their initialisation).
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        n_classes: int,
        n_experts: int = 1,
        backbone: str | nn.Module = "auto",
        hidden_sizes: Sequence[int] = (256, 256),
        expert_hidden_sizes: Sequence[int] = (128,),
        cosine_head: bool = False,
        head_scale: float = 30.0,
        reduce_dimension: bool = False,
        dropout: float = 0.0,
        backbone_weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.n_classes = int(n_classes)
        self.n_experts = int(n_experts)
        resolved = resolve_backbone(backbone, self.input_shape)
        self.trunk, make_branch = _build_backbone(
            resolved, self.input_shape, hidden_sizes=hidden_sizes,
            expert_hidden_sizes=expert_hidden_sizes, dropout=dropout,
            reduce_dimension=reduce_dimension,
        )
        self.branches = nn.ModuleList(make_branch() for _ in range(self.n_experts))
        width = self.branches[0].out_features
        self.heads = nn.ModuleList(
            NormedLinear(width, self.n_classes, head_scale) if cosine_head
            else nn.Linear(width, self.n_classes)
            for _ in range(self.n_experts)
        )
        if resolved in ("convnet", "resnet32"):
            _kaiming_init(self.heads)  # the CIFAR code initialises its whole network so
        if backbone_weights is not None:
            self.load_trunk_weights(backbone_weights)

    @property
    def feature_dim(self) -> int:
        """Width of each expert's feature vector (the input of its head)."""
        return int(self.branches[0].out_features)

    @property
    def _trunk_core(self) -> nn.Module:
        """The trunk as the user or the backbone table built it (without flattening)."""
        return self.trunk.trunk if isinstance(self.trunk, _FlattenedTrunk) else self.trunk

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """The shared trunk's state_dict, in the layout :meth:`load_trunk_weights` reads.

        Names are those of the module that maps inputs to features: a user backbone's
        own ``state_dict()`` names; for ``"resnet50"`` / ``"resnext50"`` torchvision's
        ``conv1.*``, ``bn1.*``, ``layer1.*``, ``layer2.*``; for ``"resnet32"``
        ``conv1.*``, ``bn1.*``, ``layer1.*``.
        """
        return self._trunk_core.state_dict()

    def load_trunk_weights(self, weights: str | os.PathLike | Mapping[str, torch.Tensor]
                           ) -> None:
        """Load a state_dict into the shared trunk: same names and shapes, nothing else.

        Parameters
        ----------
        weights : str, path-like or mapping of str to torch.Tensor
            The state_dict, or a local file written by ``torch.save(state_dict, path)``
            (read with ``torch.load(..., weights_only=True)``, on the CPU). Its names
            must be exactly those of :meth:`trunk_state_dict`.

        Raises
        ------
        FileNotFoundError
            The file does not exist.
        ValueError
            The file is not a state_dict, names are missing or extra (the message
            lists them and suggests the fix), or a shape differs.

        Notes
        -----
        A torchvision ResNet-50 checkpoint converts by keeping its trunk entries::

            state = torch.load("resnet50-11ad3fa6.pth", weights_only=True)
            trunk = {k: v for k, v in state.items()
                     if k.split(".")[0] in {"conv1", "bn1", "layer1", "layer2"}}
            torch.save(trunk, "resnet50_trunk.pt")

        (``resnext50_32x4d`` likewise, for ``backbone="resnext50"``). The experts'
        layer3/layer4 are not loaded: with ``reduce_dimension`` their shapes differ,
        and identical experts would start without the diversity RIDE relies on.
        """
        state = _read_state_dict(weights)
        target = self._trunk_core
        _check_trunk_state_dict(state, target.state_dict())
        target.load_state_dict(state)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Run the shared trunk."""
        return self.trunk(x)

    def expert_features(self, shared: torch.Tensor, k: int) -> torch.Tensor:
        """Feature vector (B, D) of expert ``k`` from the trunk output."""
        return self.branches[k](shared)

    def expert_logits(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """Logits (B, C) of expert ``k`` from its feature vector."""
        return self.heads[k](features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared(x)
        return torch.stack(
            [self.expert_logits(self.expert_features(shared, k), k)
             for k in range(self.n_experts)],
            dim=1,
        )


def count_macs(fn: Callable[..., Any], *args: Any) -> tuple[int, Any]:
    """Multiply-accumulates of ``fn(*args)`` and its output.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix
    products; normalisation and activations excluded), which counts two FLOPs per MAC.

    Parameters
    ----------
    fn : callable
        A module or function.
    *args
        Its inputs.

    Returns
    -------
    macs : int
    output : Any
        What ``fn(*args)`` returned.
    """
    # Imported here: torch.utils.flop_counter imports triton, which takes seconds.
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args)
    return counter.get_total_flops() // 2, out
