"""The evaluation (`cmsd-jobs eval SUITE.yaml`): methods and peers side by side on the same documents.

    suite        the suite file: corpora, models, methods, peers, sweep, floors, tolerances, execution
    docs         the suite's documents, read and checked by the job system (test and validation rows)
    runners      one runner per method (cmsd) ...
    peers        ... or peer (transformers' greedy, assisted, prompt lookup, early exit; vLLM where installed)
    measure      timing every runner on every document, round robin, in this process or in Ray actors
    metrics      per method: speed, agreement with AR, quality with paired bootstrap tests
    calibration  how well each confidence signal predicts acceptance (ECE, reliability)
    sweep        the settings grid, its Pareto front and the chosen settings
    history      the runs before (Parquet), floors and regressions
    report       report.md and report.html
    plots        the report's plots
    run          one evaluation from start to end: check, measure, analyse, compare, write
"""
