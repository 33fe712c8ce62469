"""Rebuild the demo's bundled pretrained tiny LLaVA (``pipeline/demo/resources/tiny-llava``) after a change to its
shape, its pretraining recipe or the demo's data: ``make prepare`` (the default config), then
``.venv/bin/python scripts/bundle_tiny_llava.py [key=value ...]`` (~6 minutes on one CPU core). Without a current
bundle every demo run builds the same model itself (:mod:`pipeline.demo.base_model`), which is what this runs."""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

from pipeline.core.config import load_config
from pipeline.core.cpus import set_torch_threads
from pipeline.data.formats import load_captions, split_rows
from pipeline.demo.base_model import BUNDLED, ensure_base_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("overrides", nargs="*", help="key=value, as for the stages")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    set_torch_threads()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(a.config, [*a.overrides, f"teacher.model={tmp}/tiny-llava"])
        data = load_captions(cfg.run_dir / "data" / "captions")
        built = ensure_base_model(cfg, [r["caption"] for r in split_rows(data, "train")], bundled=None)
        if BUNDLED.exists():
            shutil.rmtree(BUNDLED)
        BUNDLED.mkdir(parents=True)
        for f in sorted(built.iterdir()):
            if f.is_file() and not f.name.startswith("."):  # not the run folder's ownership marker
                shutil.copyfile(f, BUNDLED / f.name)
    print(f"bundled: {BUNDLED}")


if __name__ == "__main__":
    main()
