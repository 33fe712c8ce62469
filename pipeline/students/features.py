"""Decoder inputs of the students: cached features of a frozen encoder, or an encoder run (and fine-tuned) in
the training loop.

The feature cache is computed once per (encoder, settings, seed, image set) and stored as safetensors (float16). The
key covers the encoder's settings and weights file and every image's path, size and mtime, so changing the encoder
or any image computes a new cache instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.core.archs import ARCHS
from pipeline.core.config import EncoderSettings, StudentsConfig
from pipeline.core.rundir import atomic_write_bytes, output_lock
from pipeline.data.images import load_rgb
from pipeline.students.encoders import build_encoder, image_transform, weights_file

log = logging.getLogger(__name__)


def compute_device() -> torch.device:
    """Where students run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_key(encoder: str, settings: EncoderSettings, seed: int, image_paths: list[str]) -> str:
    h = hashlib.sha256()
    weights = weights_file(encoder, settings) if settings.pretrained else None
    stat = weights.stat() if weights and weights.is_file() else None
    meta = {"encoder": encoder, "settings": settings.model_dump(mode="json", exclude={"finetune"}), "seed": seed,
            "weights": [str(weights), stat.st_size, stat.st_mtime_ns] if stat else None}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for p in image_paths:
        st = Path(p).stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], image_size: int):
        self.paths, self.transform = paths, image_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_rgb(self.paths[i]))


@torch.no_grad()
def compute_features(encoder: torch.nn.Module, paths: list[str], image_size: int, batch_size: int = 64,
                     num_workers: int = 0, desc: str = "features") -> torch.Tensor:
    device = compute_device()
    encoder = encoder.eval().to(device)
    loader = torch.utils.data.DataLoader(ImageFiles(paths, image_size), batch_size=batch_size,
                                         num_workers=num_workers)
    chunks = []
    for images in tqdm(loader, desc=desc, unit="batch"):
        chunks.append(encoder(images.to(device)).float().cpu())
    return torch.cat(chunks)


def cached_features(folder: Path, encoder: str, settings: EncoderSettings, seed: int, paths: list[str],
                    batch_size: int = 64, num_workers: int = 0) -> tuple[torch.Tensor, dict[str, int]]:
    """Features of ``paths`` (one row per path, float32) and the path -> row index; computed once then reused.

    Concurrent callers (a Slurm array's tasks) are safe: one computes under a per-file lock while the others wait
    for it and read its file, which appears in one rename.
    """
    from safetensors.torch import save

    key = cache_key(encoder, settings, seed, paths)
    file = folder / f"{encoder}-{key}.safetensors"
    index = {p: i for i, p in enumerate(paths)}
    feats = _read_cache(file, len(paths), warn=True)
    if feats is None:
        with output_lock(file, wait=True):
            feats = _read_cache(file, len(paths))  # written by another process while this one waited
            if feats is None:
                log.info("computing %s features for %d images -> %s", encoder, len(paths), file.name)
                feats = compute_features(build_encoder(encoder, settings, seed), paths, settings.image_size,
                                         batch_size, num_workers, desc=f"{encoder} features")
                atomic_write_bytes(file, save({"features": feats.half().contiguous()},
                                              metadata={"encoder": encoder, "images": str(len(paths))}))
                return feats.half().float(), index
    log.info("feature cache hit: %s", file.name)
    return feats, index


def _read_cache(file: Path, rows: int, warn: bool = False) -> torch.Tensor | None:
    """A feature cache file's features (float32), or None where it is missing or damaged (cut short by a full disk
    or a copy: stale, so recomputed; ``warn`` logs that in one line)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        return None
    try:
        feats = load_file(file)["features"]
        if feats.shape[0] != rows:
            raise ValueError(f"{feats.shape[0]} rows for {rows} images")
    except (SafetensorError, KeyError, ValueError) as exc:
        if warn:
            log.warning("%s: damaged feature cache (%s); recomputing it", file, " ".join(str(exc).split()))
        return None
    return feats.float()


def decoder_input(arch: str, x: torch.Tensor) -> torch.Tensor:
    """Encoder output as the architecture's decoder takes it: a ``global`` architecture on a grid encoder (the course
    project's global ResNet feature, resnet101_gru) takes the mean of the grid; the others take it as it is."""
    return x.mean(1) if ARCHS[arch].features == "global" and x.dim() == 3 else x


class CachedFeatures:
    """Decoder inputs per split, rows of a frozen encoder's cached feature table."""

    def __init__(self, arch: str, table: torch.Tensor, index: dict[str, int], paths: dict[str, list[str]]):
        self.arch = arch
        self.table = table
        self.rows = {s: torch.tensor([index[p] for p in paths[s]], dtype=torch.long) for s in paths}

    @property
    def dim(self) -> int:
        return self.table.shape[-1]

    def __call__(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        return decoder_input(self.arch, self.table[self.rows[split][idx]])


class EncoderFeatures:
    """Decoder inputs computed by ``encoder`` from the images of each batch (encoder fine-tuning: no cache;
    gradients flow into the encoder unless called under ``torch.no_grad``). ``workers`` threads decode the batch's
    images (PIL releases the GIL while decoding); 0 decodes them in the caller's thread."""

    def __init__(self, arch: str, encoder: torch.nn.Module, image_size: int, paths: dict[str, list[str]],
                 workers: int = 0):
        self.arch = arch
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self.device = compute_device()
        self.encoder = encoder.to(self.device)
        self.images = {s: ImageFiles(paths[s], image_size) for s in paths}
        with torch.no_grad():
            probe = torch.zeros(1, 3, image_size, image_size, device=self.device)
            self.dim = decoder_input(arch, self.encoder.eval()(probe)).shape[-1]

    def __call__(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        load = self.images[split].__getitem__
        ids = idx.tolist()
        images = torch.stack(list(self.pool.map(load, ids)) if self.pool else [load(i) for i in ids])
        images = images.to(self.device)
        return decoder_input(self.arch, self.encoder(images))


class DecoderInputs:
    """Feature sources of a run's students: ``(arch, paths per split) -> (features, encoder being fine-tuned or
    None)``. Frozen encoders' tables of ``all_paths`` (the prepared dataset's images) are cached in ``folder`` (and in
    memory: architectures sharing an encoder share one table); images outside it (a source's unlabelled images) get
    a cache of their own. A path may appear in many rows (k captions of one image): each row reads its image's
    features. With ``students.encoder.finetune`` the encoder runs in the training loop instead."""

    def __init__(self, folder: Path, cfg: StudentsConfig, seed: int, all_paths: list[str],
                 prepare_weights: Callable[[str], None] | None = None):
        self.folder, self.cfg, self.seed, self.all_paths = folder, cfg, seed, all_paths
        self.prepare_weights = prepare_weights
        self.tables: dict[tuple[str, tuple[str, ...]], tuple[torch.Tensor, dict[str, int]]] = {}

    def ensure_weights(self, encoder: str) -> None:
        """Make ``encoder``'s pretrained weights file first, where the caller gave a way to (``prepare_weights``: the
        demo builds its stand-ins)."""
        if self.prepare_weights is not None:
            self.prepare_weights(encoder)

    def _cached(self, encoder: str, paths: list[str]) -> tuple[torch.Tensor, dict[str, int]]:
        return cached_features(self.folder, encoder, self.cfg.encoder, self.seed, paths,
                               num_workers=self.cfg.num_workers)

    def table(self, encoder: str, extra: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict[str, int]]:
        """The frozen ``encoder``'s features of every image, then of the ``extra`` images (unlabelled ones: their
        own cache file, so the run's image cache stays as it is); computed or read from the cache once."""
        if (encoder, extra) not in self.tables:
            self.ensure_weights(encoder)
            if extra:
                table, index = self.table(encoder)
                more, more_index = self._cached(encoder, list(extra))
                self.tables[encoder, extra] = (torch.cat([table, more]),
                                               {**index, **{p: len(table) + i for p, i in more_index.items()}})
            else:
                self.tables[encoder, extra] = self._cached(encoder, self.all_paths)
        return self.tables[encoder, extra]

    def __call__(self, arch: str, paths: dict[str, list[str]]):
        name, settings = ARCHS[arch].encoder, self.cfg.encoder
        if settings.finetune:
            self.ensure_weights(name)
            encoder = build_encoder(name, settings, self.seed)
            return EncoderFeatures(arch, encoder, settings.image_size, paths, self.cfg.num_workers), encoder
        known = set(self.all_paths)
        extra = tuple(sorted({p for split in paths.values() for p in split} - known))
        return CachedFeatures(arch, *self.table(name, extra), paths), None

    def build_caches(self, archs: list[str]) -> None:
        """Compute the feature cache of every frozen encoder ``archs`` use (a fine-tuned encoder has none)."""
        if not self.cfg.encoder.finetune:
            for name in dict.fromkeys(ARCHS[a].encoder for a in archs):
                self.table(name)
