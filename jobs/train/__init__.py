"""Drafters fitted to a target, for `cmsd-jobs calibrate` and `cmsd-jobs distill`.

    calibrate   SpecBound's exit layer and temperatures, stored beside the model (cmsd.train.calibrate)
    distill     a small drafter built from the target and trained on its own predictions (cmsd.train.distill), or a
                feature head on its features (cmsd.train.head), with held-out rows, resumable stages and a model card

Only the orchestration is here (the CLI-level stages, resume, progress bars, model cards); what trains and fits is
the library's, cmsd.train.
"""
