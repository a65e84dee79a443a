"""Inference: sliding-window prediction over whole volumes."""
