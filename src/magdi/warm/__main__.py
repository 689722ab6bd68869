"""``python -m magdi.warm serve|run ...``."""

import sys

from magdi.warm.server import main

sys.exit(main())
