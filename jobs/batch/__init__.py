"""The job system: a corpus in, a job directory out (DESIGN.md's files), every document exactly once.

    spec        JobSpec and its sections, from YAML and --set overrides (checked when built)
    corpus      reading a corpus in any format (JSONL, CSV/TSV, Parquet, Arrow, `datasets`, text)
    rows        each row checked and rendered into a prompt; a bad row becomes an error record
    shards      deterministic shard plans and the Arrow shard files
    models      the models checked before anything is written (config and tokenizer only)
    prepare     all checks, then the job directory: spec.yaml, manifest.json, shards/, errors/
    manifest    manifest.json: shards, their state, the code that ran them
    driver      Ray: actors decode the shards, a dead worker's shard goes to another, results are committed once
    reducer     summary.json from the shards' results: quality (BLEU/chrF, ROUGE), speed, acceptance
    quality     the corpus scores (sacrebleu, rouge-score)
    report      report.md, report.html, plots/
    progress    a progress bar on a terminal, log lines otherwise
    lifecycle   submit, resume, status, report: what the CLI calls

The Ray actors themselves are in `workers` (they import cmsd, never jobs).
"""
