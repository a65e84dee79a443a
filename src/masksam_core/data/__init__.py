"""Data sets and the data pipeline: the nnU-Net v2 raw layout and its checks (``dataset``)."""
