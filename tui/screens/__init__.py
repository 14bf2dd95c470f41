"""Screens of the finetui app: setup, freeze map, training, runs (the four modes), and dialogs."""
