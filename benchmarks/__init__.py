"""Benchmark scripts of napari-masksam; ``python benchmarks/run.py --help`` runs the suite."""
