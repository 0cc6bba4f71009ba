"""LoRA-X core: factorize base weights, compare bases, transfer adapters, read and write them.

A plain library (torch, safetensors, numpy, POT). See ``core/README.md`` for the map.
"""
