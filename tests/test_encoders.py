import pytest
import torch

from pipeline.core.config import EncoderSettings
from pipeline.students.encoders import build_encoder


def test_vit_tokens_equal_torchvisions_own_patch_embedding():
    """ViTTokens computes the tokens with public modules only; they equal VisionTransformer's own computation."""
    encoder = build_encoder("vit_b_16", EncoderSettings(width=0.25, image_size=32), seed=3).eval()
    image = torch.randn(2, 3, 32, 32)
    vit = encoder.vit
    with torch.no_grad():
        patches = vit._process_input(image)  # torchvision's private method, as the reference only
        expected = vit.encoder(torch.cat([vit.class_token.expand(2, -1, -1), patches], dim=1))
        assert torch.equal(encoder(image), expected)
        with pytest.raises(ValueError, match="32x32"):
            encoder(torch.randn(1, 3, 48, 48))
