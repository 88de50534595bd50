"""`python -m jobs` is `cmsd-jobs`."""

from jobs.cli import main

main()
