"""``python -m magdi.warm serve|run ...`` (see ``magdi.warm.cli``)."""

import sys

from magdi.warm.cli import main

sys.exit(main())
