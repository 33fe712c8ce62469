"""Image encoders of the students, from torchvision: VGG19 (fc7), ResNet-101 (7x7x2048 grid), ViT-B/16 (tokens).

``pretrained: true`` loads ImageNet weights from a local file only (the torch hub cache or ``weights_dir``); nothing
is downloaded. The demo builds the same families scaled down (``width`` < 1, fewer blocks) with random weights, at
low resolution, so it runs in minutes on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.vgg import make_layers
from torchvision.models.vision_transformer import VisionTransformer

from pipeline.config import EncoderSettings
from pipeline.errors import PipelineError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# which encoder (and so which feature cache) each student architecture uses
ENCODER_OF = {"vgg19_gru": "vgg19", "resnet101_gru": "resnet101", "resnet101_attn_gru": "resnet101",
              "vit_transformer": "vit_b_16"}
WEIGHTS = {"vgg19": models.VGG19_Weights.IMAGENET1K_V1, "resnet101": models.ResNet101_Weights.IMAGENET1K_V2,
           "vit_b_16": models.ViT_B_16_Weights.IMAGENET1K_V1}


def _scaled(n: int, width: float) -> int:
    return max(8, int(round(n * width)))


class VGGFc7(nn.Module):
    """VGG19 up to the second fully connected layer (+ReLU): one 4096-d vector per image (the seed's feature).
    ``imagenet``: torchvision's VGG19 weights (its own state-dict layout), loaded before the classifier is cut."""

    def __init__(self, settings: EncoderSettings, imagenet: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if settings.pretrained or settings.width == 1.0:
            vgg = _loaded(models.vgg19(), imagenet)
            self.features, self.pool = vgg.features, vgg.avgpool
            self.fc = vgg.classifier[:-1]  # fc6-relu-drop-fc7-relu-drop
        else:
            cfg = [_scaled(c, settings.width) if c != "M" else c for c in
                   (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512,
                    512, "M")]
            # like VGG19: pool to 7x7 and flatten into fc6 (a global average of random conv features would be the
            # same for every image)
            self.features, self.pool = make_layers(cfg), nn.AdaptiveAvgPool2d(7)
            dim = _scaled(4096, settings.width)
            self.fc = nn.Sequential(nn.Linear(cfg[-2] * 49, dim), nn.ReLU(True), nn.Linear(dim, dim), nn.ReLU(True))
            for m in self.features.modules():  # torchvision's VGG init; PyTorch's default lets the biases drown
                if isinstance(m, nn.Conv2d):  # the signal after 16 layers, giving every image the same feature
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class ResNetGrid(nn.Module):
    """ResNet-101 without pooling/classifier: a grid of region features [B, H*W, 2048] (7x7 at 224 px).
    ``imagenet``: torchvision's ResNet-101 weights, loaded before pooling and classifier are cut."""

    def __init__(self, settings: EncoderSettings, imagenet: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if settings.pretrained or settings.width == 1.0:
            net = _loaded(models.resnet101(), imagenet)
        else:
            net = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=_scaled(64, settings.width))
        self.body = nn.Sequential(*list(net.children())[:-2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(2).transpose(1, 2)


class ViTTokens(nn.Module):
    """ViT-B/16 encoder output: the class token and one token per 16x16 patch [B, 1+N, 768].
    ``imagenet``: torchvision's ViT-B/16 weights."""

    def __init__(self, settings: EncoderSettings, imagenet: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if settings.pretrained or settings.width == 1.0:
            self.vit = _loaded(models.vit_b_16(image_size=224 if settings.pretrained else settings.image_size),
                               imagenet)
        else:
            hidden = _scaled(768, settings.width) // 4 * 4
            self.vit = VisionTransformer(image_size=settings.image_size, patch_size=16, num_layers=2, num_heads=4,
                                         hidden_dim=hidden, mlp_dim=hidden * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.vit.image_size
        if x.shape[-2:] != (size, size):
            raise ValueError(f"ViT encoder built for {size}x{size} images got {tuple(x.shape[-2:])}")
        # VisionTransformer's own patch embedding: [B, hidden, H/16, W/16] -> [B, H/16 * W/16, hidden]
        patches = self.vit.conv_proj(x).flatten(2).transpose(1, 2)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        return self.vit.encoder(torch.cat([cls, patches], dim=1))


def _loaded(model: nn.Module, state: dict[str, torch.Tensor] | None) -> nn.Module:
    if state is not None:
        model.load_state_dict(state)
    return model


BUILDERS = {"vgg19": VGGFc7, "resnet101": ResNetGrid, "vit_b_16": ViTTokens}


def weights_file(name: str, settings: EncoderSettings) -> Path:
    filename = Path(WEIGHTS[name].url).name
    folder = settings.weights_dir or Path(torch.hub.get_dir()) / "checkpoints"
    return Path(folder) / filename


def build_encoder(name: str, settings: EncoderSettings, seed: int = 0) -> nn.Module:
    """The named encoder, with local ImageNet weights when ``settings.pretrained`` (never downloaded)."""
    torch.manual_seed(seed)
    if settings.pretrained and name == "vit_b_16" and settings.image_size != 224:
        raise PipelineError(f"students.encoder.image_size={settings.image_size}: pretrained ViT-B/16 needs 224")
    if not settings.pretrained:
        return BUILDERS[name](settings)
    path = weights_file(name, settings)
    if not path.is_file():
        raise PipelineError(f"ImageNet weights for {name} not found at {path}; put {path.name} there (or set "
                            "students.encoder.weights_dir) or use students.encoder.pretrained=false")
    return BUILDERS[name](settings, torch.load(path, map_location="cpu", weights_only=True))


def image_transform(image_size: int):
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
