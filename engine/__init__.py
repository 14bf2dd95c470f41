"""finetui engine: headless fine-tuning (config, models, data, strategies, freeze map, training, events)."""

import logging

# bitsandbytes warns at import time on CPUs about an optional kernel package it cannot fetch offline.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
