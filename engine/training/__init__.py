"""The training run: its phases, the Hugging Face Trainer and its callback, and what a run measures."""
