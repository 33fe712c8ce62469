"""Image encoders of the students, from torchvision: VGG19 (fc7), ResNet-101 (7x7x2048 grid), ViT-B/16 (tokens).

``pretrained: true`` loads torchvision weights from a local file only (the torch hub cache or ``weights_dir``);
nothing is downloaded. The demo builds the same families scaled down (``width`` < 1, fewer blocks) at low resolution,
so it runs in minutes on a CPU, with stand-in weights (see ``pipeline.demo.standins``) in the same file layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.vgg import make_layers
from torchvision.models.vision_transformer import VisionTransformer

from pipeline.core.config import EncoderSettings
from pipeline.core.errors import PipelineError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHTS = {"vgg19": models.VGG19_Weights.IMAGENET1K_V1, "resnet101": models.ResNet101_Weights.IMAGENET1K_V2,
           "vit_b_16": models.ViT_B_16_Weights.IMAGENET1K_V1}


def _scaled(n: int, width: float) -> int:
    return max(8, int(round(n * width)))


def torchvision_model(name: str, settings: EncoderSettings) -> nn.Module:
    """The torchvision model of an encoder family, full size (``width`` 1) or scaled down (the demo's), in
    torchvision's own module layout, so a state dict saved from it is a torchvision weights file."""
    if settings.width == 1.0:
        if name == "vit_b_16":
            return models.vit_b_16(image_size=settings.image_size)
        return models.vgg19() if name == "vgg19" else models.resnet101()
    if name == "vgg19":
        # one convolution per stage instead of VGG19's 2-2-4-4-4 (as the ResNet below has one block per stage): the
        # 16-convolution plain net does not train from scratch in the demo's few steps (constant features)
        channels = [c for width in (64, 128, 256, 512, 512) for c in (_scaled(width, settings.width), "M")]
        vgg = models.VGG(make_layers(channels))  # torchvision's VGG init (PyTorch's default drowns the signal)
        dim = _scaled(4096, settings.width)
        vgg.classifier = nn.Sequential(nn.Linear(channels[-2] * 49, dim), nn.ReLU(True), nn.Dropout(),
                                       nn.Linear(dim, dim), nn.ReLU(True), nn.Dropout(), nn.Linear(dim, 1000))
        return vgg
    if name == "resnet101":
        return ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=_scaled(64, settings.width))
    hidden = _scaled(768, settings.width) // 4 * 4
    return VisionTransformer(image_size=settings.image_size, patch_size=16, num_layers=2, num_heads=4,
                             hidden_dim=hidden, mlp_dim=hidden * 4)


class VGGFc7(nn.Module):
    """VGG19 up to the second fully connected layer (+ReLU): one 4096-d vector per image (the course
    project's feature)."""

    def __init__(self, vgg: models.VGG):
        super().__init__()
        self.features, self.pool = vgg.features, vgg.avgpool
        self.fc = vgg.classifier[:-1]  # fc6-relu-drop-fc7-relu-drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class ResNetGrid(nn.Module):
    """ResNet-101 without pooling/classifier: a grid of region features [B, H*W, 2048] (7x7 at 224 px)."""

    def __init__(self, net: ResNet):
        super().__init__()
        self.body = nn.Sequential(*list(net.children())[:-2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(2).transpose(1, 2)


class ViTTokens(nn.Module):
    """ViT-B/16 encoder output: the class token and one token per 16x16 patch [B, 1+N, 768]."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.vit.image_size
        if x.shape[-2:] != (size, size):
            raise ValueError(f"ViT encoder built for {size}x{size} images got {tuple(x.shape[-2:])}")
        # VisionTransformer's own patch embedding: [B, hidden, H/16, W/16] -> [B, H/16 * W/16, hidden]
        patches = self.vit.conv_proj(x).flatten(2).transpose(1, 2)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        return self.vit.encoder(torch.cat([cls, patches], dim=1))


BUILDERS = {"vgg19": VGGFc7, "resnet101": ResNetGrid, "vit_b_16": ViTTokens}


def encoder_module(name: str, model: nn.Module) -> nn.Module:
    """The encoder over a torchvision model (its parameters shared), in channels-last memory format: the fast
    convolution layout of oneDNN and cuDNN (the demo's VGG and ResNet train ~1.3x faster on a CPU,
    ``make bench``). Weights are saved contiguous, so the files keep torchvision's layout."""
    return BUILDERS[name](model).to(memory_format=torch.channels_last)


def weights_file(name: str, settings: EncoderSettings) -> Path:
    filename = Path(WEIGHTS[name].url).name
    folder = settings.weights_dir or Path(torch.hub.get_dir()) / "checkpoints"
    return Path(folder) / filename


def build_encoder(name: str, settings: EncoderSettings, seed: int = 0) -> nn.Module:
    """The named encoder; with ``settings.pretrained`` its torchvision weights file is loaded (ImageNet weights, or
    the demo's stand-in for them), never downloaded."""
    torch.manual_seed(seed)
    if settings.pretrained and name == "vit_b_16" and settings.width == 1.0 and settings.image_size != 224:
        raise PipelineError(f"students.encoder.image_size={settings.image_size}: pretrained ViT-B/16 needs 224")
    if not settings.pretrained:
        return encoder_module(name, torchvision_model(name, settings))
    path = weights_file(name, settings)
    if not path.is_file():
        raise PipelineError(f"pretrained weights for {name} not found at {path}; put {path.name} there (or set "
                            "students.encoder.weights_dir) or use students.encoder.pretrained=false")
    with torch.device("meta"):  # every tensor comes from the file: initialising them first would be wasted work
        model = torchvision_model(name, settings)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # assigned, not copied: cast as init would
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    except RuntimeError as exc:
        raise PipelineError(f"{path}: not weights of a {name} at students.encoder.width={settings.width} "
                            f"({str(exc).splitlines()[0]})") from None
    return encoder_module(name, model)


def image_transform(image_size: int):
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
