"""`make bench`: performance figures measured side by side in one run, printed as a table.

Sections (``--only name,name``): prepare (44,096-record dataset), and the later stages' sections as they land.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from argparse import Namespace
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data.synthetic import load_caption_pool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCHES: dict[str, Callable[[Path], dict]] = {}


def bench(fn: Callable[[Path], dict]) -> Callable[[Path], dict]:
    BENCHES[fn.__name__.removeprefix("bench_")] = fn
    return fn


@bench
def bench_prepare(work: Path, n: int = 44_096) -> dict:
    """`prepare` over a full-size (44,096-record) single-file dataset with small images, full pixel decode."""
    from stages import prepare

    raw = work / "raw44k"
    (raw / "images").mkdir(parents=True)
    captions = [c for split in load_caption_pool().values() for c in split.values()]
    names = [f"{'WOMEN' if i % 3 else 'MEN'}-Tees_Tanks-id_{i // 4:08d}-01_{i % 4 + 1}_front.jpg" for i in range(n)]
    tile = Image.new("RGB", (24, 24), (90, 120, 150))
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda name: tile.save(raw / "images" / name, quality=90), names))
    (raw / "captions.json").write_text(json.dumps({name: captions[i % len(captions)] for i, name in enumerate(names)}))
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"run_dir={work / 'run'}", f"data.root={raw}", "data.synthetic=null"])
    t0 = time.perf_counter()
    prepare.run(cfg, Namespace(force=True))
    seconds = time.perf_counter() - t0
    return {"records": n, "prepare_seconds": round(seconds, 2), "records_per_s": round(n / seconds),
            "target": "< 120 s on 2 cores"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated sections")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name in args.only.split(","):
            print(f"== {name}", flush=True)
            results[name] = BENCHES[name](Path(tmp) / name)
            for k, v in results[name].items():
                print(f"  {k:32s} {v}")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
