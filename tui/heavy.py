"""The heavy half of the engine (torch, transformers, peft, datasets), imported once, in a worker thread.

transformers' lazy module is not safe to import from two threads at once (`cannot import name 'AutoModel'`),
and the app may start a data preview, a freeze map and a run close together. Every worker therefore calls
`load_engine()` first: the first one imports, the others wait for it. The app also starts it in the
background right after its first screen is painted.

Torch's OpenMP threads sleep between parallel regions here (OMP_WAIT_POLICY=PASSIVE, unless set): spinning,
the idle one keeps a core busy that the UI thread then takes from the one that computes, and on 2 cores the
app trained at ~0.90 of `finetui run` (spinning both), against ~0.99 with both passive (bench/tui_parity.py).
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
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads libgomp
        import engine.data
        import engine.inspect
        import engine.trainer  # noqa: F401  (imports torch, transformers, peft, datasets, sklearn)

        # Half a million long-lived objects now: a full garbage collection would scan them all (~0.3 s with the
        # GIL held, a frozen UI). Frozen, they are left out of every collection.
        gc.freeze()
        _loaded = True
