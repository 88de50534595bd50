"""cmsd-jobs: CM-ASD decoding over whole corpora as Ray batch jobs (CLI, spec, sharding, driver, reducer).

The command line is `cmsd-jobs` (jobs.cli:main); the job's life is in jobs.job.
"""
