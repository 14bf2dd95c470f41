"""Using what a run trained: loading it for inference, scoring it on new data."""
