"""The two ways a job ends badly, each with its exit code (DESIGN.md)."""

from __future__ import annotations


class BadInput(ValueError):
    """Spec, corpus or model that cannot be used; found before anything is written. Exit code 2."""

    exit_code = 2


class JobFailed(RuntimeError):
    """The job ran but did not finish (a shard failed past its retries, or the results do not add up). Exit 1."""

    exit_code = 1
