"""Stand-ins for the students' ImageNet weights in the demo.

Real students start from torchvision's ImageNet checkpoints. The demo's encoders are the same families scaled down,
so no such checkpoint exists for them; instead each is trained briefly on the attribute labels of rendered images
whose captions are in no split (``data.pretraining``) and saved as a torchvision weights file (the model's own
``state_dict``, torchvision's file name) in ``students.encoder.weights_dir``. The students then load it through the
same ``students.encoder.pretrained`` path a real checkpoint takes. A ``<file>.json`` beside each file records what it
was built from (rebuilt when that changes) and the held-out accuracy per attribute: how much of each label the
rendered images let a small model read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.core.config import Config, EncoderSettings
from pipeline.core.rundir import atomic_write_bytes, atomic_write_json, output_lock
from pipeline.demo.attribute_heads import attribute_targets, pretrain_on_attributes
from pipeline.students.encoders import encoder_module, image_transform, torchvision_model, weights_file

log = logging.getLogger(__name__)


def stand_in_settings(name: str, settings: EncoderSettings, seed: int, pretraining_root: Path) -> dict:
    """What a stand-in weights file depends on."""
    images = json.loads((Path(pretraining_root) / "README.json").read_text())
    with torch.device("meta"):  # shapes only: no weights to initialise (VGG's took seconds in every student step)
        shapes = {k: list(v.shape) for k, v in torchvision_model(name, settings).state_dict().items()}
    layout = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]  # the model's own shape
    return {"encoder": name, "width": settings.width, "image_size": settings.image_size, "layout": layout,
            "stand_in": settings.stand_in.of(name).model_dump(mode="json"), "seed": seed, "pretraining_images": images}


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def ensure_stand_in(name: str, settings: EncoderSettings, seed: int, pretraining_root: Path) -> Path:
    """The stand-in weights file of encoder ``name``, trained now unless it exists with these settings."""
    path = weights_file(name, settings)
    wanted = stand_in_settings(name, settings, seed, pretraining_root)
    if path.is_file() and _record(path).is_file() and json.loads(_record(path).read_text())["settings"] == wanted:
        return path
    from pipeline.data.images import load_rgb

    captions = json.loads((Path(pretraining_root) / "captions.json").read_text())
    names = sorted(captions)[: settings.stand_in.images]
    transform = image_transform(settings.image_size)
    images = torch.stack([transform(load_rgb(Path(pretraining_root) / "images" / n)) for n in names])
    torch.manual_seed(seed)
    model = torchvision_model(name, settings)
    encoder = encoder_module(name, model)

    def features(x: torch.Tensor) -> torch.Tensor:  # every region / token: where a thing is drawn matters
        return encoder(x).flatten(1)

    with torch.no_grad():
        dim = features(images[:1]).shape[-1]
    stand_in = settings.stand_in.of(name)
    accuracy = pretrain_on_attributes(features, encoder, dim, images, attribute_targets([captions[n] for n in names]),
                                      epochs=stand_in.epochs, batch_size=stand_in.batch_size,
                                      lr=stand_in.learning_rate, seed=seed, desc=f"pretrain {name} stand-in")
    buffer = io.BytesIO()
    torch.save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_json(_record(path), {"settings": wanted, "held_out_accuracy": accuracy,
                                      "held_out_macro": round(sum(accuracy.values()) / len(accuracy), 4)})
    log.info("%s stand-in weights: %s", name, path)
    return path


def stand_in_weights(cfg: Config) -> Callable[[str], None] | None:
    """What builds an encoder's stand-in weights file before its features are computed (``students.encoder.stand_in``;
    None without stand-ins), holding the file's lock so that parallel steps build it once."""
    settings = cfg.students.encoder
    if settings.stand_in is None:
        return None
    root = cfg.data.pretraining.root if cfg.data.pretraining else None

    def build(encoder: str) -> None:
        with output_lock(weights_file(encoder, settings), wait=True):
            ensure_stand_in(encoder, settings, cfg.seed, root)

    return build
