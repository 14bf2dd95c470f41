"""Widgets of the finetui app."""
