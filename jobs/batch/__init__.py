"""The job system: a corpus in, a job directory out (DESIGN.md's files), every document exactly once.

    spec        JobSpec and its sections, from YAML and --set overrides (checked when built)
    corpus      reading a corpus in any format as a stream of bounded batches (JSONL, CSV/TSV, Parquet, Arrow,
                `datasets`, text, hub)
    rows        each row checked as the corpus streams by; a bad row becomes an error record
    shards      deterministic shards, each written as soon as it is complete
    models      the models checked before anything is written (config and tokenizer only)
    prepare     the up-front checks, then the job directory: shards/, errors/, spec.yaml, manifest.json last
    manifest    manifest.json: shards, their state, the code that ran them
    driver      Ray: actors decode the shards, a dead worker's shard goes to another, results are committed once
    reducer     summary.json from the shards' results: quality (BLEU/chrF, ROUGE), speed, acceptance
    quality     the corpus scores (sacrebleu, rouge-score)
    report      report.md, report.html, plots/
    progress    a progress bar on a terminal, log lines otherwise
    tune        `cmsd-jobs tune`: the plan a job's actors would run here, measured without a job
    lifecycle   submit, resume, status, report: what the CLI calls

The Ray actors themselves are in `workers` (they import cmsd, never jobs).
"""
