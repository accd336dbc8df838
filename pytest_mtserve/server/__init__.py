"""The model server: a Megatron-Core checkpoint behind PyTriton and an OpenAI-compatible API.

Runs under torchrun; knows nothing of pytest. Start it with ``mtserve serve`` or
``python -m pytest_mtserve.server``.
"""
