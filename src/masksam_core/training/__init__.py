"""Training MaskSAM: per-slice targets, the Hungarian matcher, the set criterion and the training loop."""
