"""Runs trained by other processes: starting them (a detached child, torchrun workers) and following them."""
