"""The heavy half of the engine (torch, transformers, peft, datasets), imported once, in a worker thread.

transformers' lazy module is not safe to import from two threads at once (`cannot import name 'AutoModel'`),
and the app may start a data preview, a freeze map and a run close together. Every worker therefore calls
`load_engine()` first: the first one imports, the others wait for it. The app also starts it in the
background right after its first screen is painted.

Torch's OpenMP threads keep libgomp's default wait policy, as in `finetui run`: OMP_WAIT_POLICY=PASSIVE (threads
sleep between parallel regions) cost `finetui run quickstart` 23-26 % of its samples/s on an idle 2-core machine
(74 and 63 against 57 and 47), so the app does not set it either (bench/tui_parity.py).
"""

from __future__ import annotations

import gc
import importlib
import threading

ENGINE_MODULES = ("engine.api", "engine.data", "engine.data_report", "engine.inference.loading", "engine.inspect")
"""The engine modules the workers use: torch, transformers, peft, datasets and sklearn come with them."""
_lock = threading.Lock()
_loaded = False


def load_engine() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        for name in ENGINE_MODULES:
            importlib.import_module(name)
        # Half a million long-lived objects now: a full garbage collection would scan them all (~0.3 s with the
        # GIL held, a frozen UI). Frozen, they are left out of every collection.
        gc.freeze()
        _loaded = True
