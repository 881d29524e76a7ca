"""Caching methods attach to an unmodified model and listen to the sampler's steps."""

from rfc.cache.base import CacheMethod, MethodStats, NoCache

__all__ = ["CacheMethod", "MethodStats", "NoCache"]
