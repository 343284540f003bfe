"""Opacus's `opacus.utils.batch_memory_manager` name: BatchMemoryManager (fastdp.engine's)."""

from fastdp.engine.batch_memory_manager import BatchMemoryManager

__all__ = ["BatchMemoryManager"]
