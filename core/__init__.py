"""LoRA-X core: factorize base weights, compare bases, transfer adapters, read and write them.

A plain library (torch, safetensors, numpy, POT). Import from the modules themselves
(``from core.transfer import transfer_adapter``); each lists its public names in ``__all__``,
and ``core/README.md`` maps them. Importing ``core`` (or ``core.errors``) loads nothing else.
"""
