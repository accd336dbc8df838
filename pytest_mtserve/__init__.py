"""pytest-mtserve: gate Megatron-Core checkpoints on benchmark scores from a pytest run.

Importing this package (as pytest does for every entry-point plugin) must stay cheap:
nothing here imports torch, megatron or pytriton.
"""

__version__ = "0.1.0"
