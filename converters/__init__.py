"""Adapter and model format converters (installed as ``edge_tune.converters``).

Pure format code on numpy and the ``gguf`` package: no torch at module level.
"""
