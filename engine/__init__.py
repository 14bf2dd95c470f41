"""finetui engine: headless fine-tuning (config, models, data, strategies, freeze map, training, events)."""

import logging
import os

# Safe by default: every torch.load in this process (ours, transformers', peft's) unpickles only tensors and
# plain containers, never arbitrary objects, whatever the call site asks (torch honours this at call time).
if not os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
    os.environ.setdefault("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")

# bitsandbytes tries at import time, on CPUs with AVX512-BF16, to fetch an optional kernel from the hub through
# `kernels` (a transformers dependency since 5.25); both warn when it cannot, offline or untrusted.
for _library in ("bitsandbytes", "kernels"):
    logging.getLogger(_library).setLevel(logging.ERROR)
