"""Fault tests: the fixtures of ``tests/helpers_cache.py`` (tiny teacher and cache, built once per session)."""

from helpers_cache import tiny_cache, tiny_root, tiny_teacher  # noqa: F401  (tests/ is on sys.path)
