"""The heavy half of the engine (torch, transformers, peft, datasets), imported once, in a worker thread.

transformers' lazy module is not safe to import from two threads at once (`cannot import name 'AutoModel'`),
and the app may start a data preview, a freeze map and a run close together. Every worker therefore calls
`load_engine()` first: the first one imports, the others wait for it. The app also starts it in the
background right after its first screen is painted.
"""

from __future__ import annotations

import gc
import os
import threading

_lock = threading.Lock()
_loaded = False


def load_engine() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        # torch's OpenMP threads spin while they wait for work. Beside the UI thread (and on a shared machine)
        # that spinning takes the cores from whoever needs them: measured on 2 cores under load, the quickstart
        # trained at 5 samples/s spinning and 30 without, and the UI answered keys later. Must precede torch.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import engine.data
        import engine.inspect
        import engine.trainer  # noqa: F401  (imports torch, transformers, peft, datasets, sklearn)

        # Half a million long-lived objects now: a full garbage collection would scan them all (~0.3 s with the
        # GIL held, a frozen UI). Frozen, they are left out of every collection.
        gc.freeze()
        _loaded = True
