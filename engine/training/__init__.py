"""Training and evaluation of one run: the session's phases, the HF Trainer and its callback, metrics, faults."""
