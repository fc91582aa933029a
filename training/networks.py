"""The two networks: a ResNet tumor classifier and a ResUNet tumor segmenter.

Parameter names follow torchvision's ResNets (conv1, bn1, layer1.0.conv1, ...,
fc) so an ImageNet checkpoint loads with `load_matching_weights` when the
width is 64. The ResUNet's encoder is a whole ResNet, head included: it can
start from a trained classifier, and joint training (`forward_both`) trains the
classifier and the segmenter as one network, whose encoder is then exported as
the classifier.
"""

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-18/34 layout (BasicBlock) with a configurable base width.

    `width=64, blocks=(2, 2, 2, 2)` is torchvision's resnet18 exactly (but the head).
    """

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 32, num_outputs: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage_channels = [width * 2**i for i in range(len(blocks))]
        in_channels = width
        for i, (count, channels) in enumerate(zip(blocks, self.stage_channels, strict=True)):
            layer = [BasicBlock(in_channels, channels, 1 if i == 0 else 2)]
            layer += [BasicBlock(channels, channels) for _ in range(count - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            in_channels = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_outputs)
        self.num_stages = len(blocks)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at 1/2 (stem), 1/4, 1/8, ... of the input size."""
        x = self.relu(self.bn1(self.conv1(x)))
        maps = [x]
        x = self.maxpool(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tumor logit, shape (N, num_outputs)."""
        return self.fc(torch.flatten(self.avgpool(self.features(x)[-1]), 1))


class ResidualConv(nn.Module):
    """Two 3x3 convs with a 1x1 projection shortcut: the ResUNet's decoder unit."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResUNet(nn.Module):
    """Residual encoder (a ResNet trunk), residual bottleneck, residual decoder with skips.

    The last decoder stage works at full resolution with a skip from a shallow
    full-resolution conv, so mask boundaries are not limited by the stem's stride.
    """

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 32) -> None:
        super().__init__()
        self.encoder = ResNet(blocks, width)  # its avgpool + fc give the tumor logit of joint training
        deepest = self.encoder.stage_channels[-1]
        self.bottleneck = BasicBlock(deepest, deepest)
        self.full_resolution = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True)
        )
        # Skips from deep to shallow: stages 3..1, the stem (1/2) and the full-resolution conv.
        skips = [*self.encoder.stage_channels[-2::-1], width, width // 2]
        decoder = []
        in_channels = deepest
        for skip in skips:
            decoder.append(ResidualConv(in_channels + skip, skip))
            in_channels = skip
        self.decoder = nn.ModuleList(decoder)
        self.head = nn.Conv2d(in_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tumor logit per pixel, shape (N, 1, H, W); H and W divisible by 32."""
        return self.decode(x, self.encoder.features(x))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tumor logit per pixel (N, 1, H, W), tumor logit per slice (N, 1)) from one encoder pass."""
        maps = self.encoder.features(x)
        tumor_logit = self.encoder.fc(torch.flatten(self.encoder.avgpool(maps[-1]), 1))
        return self.decode(x, maps), tumor_logit

    def decode(self, x: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        skips = [*maps[-2::-1], self.full_resolution(x)]
        y = self.bottleneck(maps[-1])
        for block, skip in zip(self.decoder, skips, strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        return self.head(y)


class BothHeads(nn.Module):
    """A ResUNet whose forward gives both heads: what joint training (and DistributedDataParallel) calls."""

    def __init__(self, model: ResUNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_both(x)


def build_model(kind: str, width: int, blocks: tuple[int, ...]) -> ResNet | ResUNet:
    """`classifier` -> ResNet; `segmenter` and `joint` (both heads, trained together) -> ResUNet."""
    return ResNet(blocks, width) if kind == "classifier" else ResUNet(blocks, width)


def load_matching_weights(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy every tensor whose name and shape match; return the names that were loaded.

    Used for torchvision ImageNet checkpoints (their 1000-class fc is skipped) and
    for starting the segmenter's encoder from the trained classifier.
    """
    own = module.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not loaded.keys() & dict(module.named_parameters()).keys():
        raise ValueError("no parameter of the checkpoint matches this network (names or shapes differ)")
    module.load_state_dict(loaded, strict=False)
    return sorted(loaded)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_gflops(module: nn.Module, size: int) -> float:
    """Forward GFLOPs (2 x multiply-adds of convs and linears) for one 3 x size x size input."""
    total = 0

    def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            per_output = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
            total += 2 * per_output * output.numel()
        elif isinstance(layer, nn.Linear):
            total += 2 * layer.in_features * output.numel()

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = module.training
    module.eval()
    with torch.no_grad():
        module(torch.zeros(1, 3, size, size))
    module.train(was_training)
    for handle in handles:
        handle.remove()
    return total / 1e9
