"""finetui engine: headless fine-tuning (config, models, data, strategies, freeze map, training, events)."""
