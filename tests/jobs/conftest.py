"""Fixtures of the jobs tests: a real local Ray and a tiny target model (see tests/raytest.py)."""

from tests.raytest import ray_local, tiny_target  # noqa: F401  (fixtures)
