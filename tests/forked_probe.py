"""``python -m tests.forked_probe <out> [status]`` for test_scheduler: writes whether torch was imported before this
module ran (a forked step's server preloads it), its CPU share and torch's thread count, then exits with ``status``."""

import os
import sys

PRELOADED = "torch" in sys.modules

if __name__ == "__main__":
    import torch

    with open(sys.argv[1], "w") as out:
        out.write(f"{PRELOADED} {os.environ['OMP_NUM_THREADS']} {torch.get_num_threads()}")
    print("probe ran")
    sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
