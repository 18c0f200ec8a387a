"""The compiled-artifact cache: every compiled graph stored under a content key."""

from flagtree_py.cache.key import cache_key
from flagtree_py.cache.store import CacheEntry, KernelCache, default_cache_dir

__all__ = ["CacheEntry", "KernelCache", "cache_key", "default_cache_dir"]
