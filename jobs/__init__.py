"""cmsd-jobs: CM-ASD decoding over whole corpora as Ray batch jobs, its evaluation, and the tools around them.

    jobs/cli/     the `cmsd-jobs` command line (jobs.cli:main): thin Click commands over the packages below
    jobs/batch/   the job system: spec, corpus, rows, shards, prepare, manifest, models, driver, reducer, quality,
                  report, progress; lifecycle (submit, resume, status) ties them together
    jobs/eval/    the evaluation (`cmsd-jobs eval`): suite, docs, runners, peers, measure, metrics, sweep,
                  calibration, history, report, plots; run does one evaluation from start to end
    jobs/train/   drafters fitted to a target: SpecBound's calibration, distilled drafters
    jobs/k8s/     KubeRay manifests rendered from a job spec
    jobs/errors   BadInput (exit code 2) and JobFailed (exit code 1), shared by all of them
    jobs/data/, jobs/suites/   the demo job and the evaluation suites

The decoding itself is the library `cmsd` (no Ray, no Click); the Ray actors are in `workers`.
"""
