"""Runnable worked examples against a live service (see the README)."""
