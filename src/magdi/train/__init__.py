"""One training core for every method of the paper (a package: ``items``: methods, items, batching and the
update count; ``model``: the student with its heads; ``loop``: the loop, schedule, checkpoints and adapter).

A method only decides *which* chains of a MAG are used and *which* losses are on (``method_spec``,
``build_items``). Everything else is shared: each step runs every unique (prompt, chain) through the
LM once, and L_ntp, L_contrastive and L_graph all reuse that one pass (``MagdiStudent.forward``).
Graphs keep their own size (PyG batching); steps are length-grouped; checkpoints hold only
safetensors + JSON (no pickle) and resume bit-exactly on CPU.
"""

from .items import *  # noqa: F403
from .items import __all__ as _items
from .loop import *  # noqa: F403
from .loop import __all__ as _loop
from .model import *  # noqa: F403
from .model import __all__ as _model

__all__ = [*_items, *_model, *_loop]
