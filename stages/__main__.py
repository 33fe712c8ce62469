"""``python -m stages <stage> ...``: the same as the ``fashion-distill`` command."""

import sys

from stages.main import main

sys.exit(main())
