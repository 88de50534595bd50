"""Drafters fitted to a target, for `cmsd-jobs calibrate` and `cmsd-jobs distill`.

    calibrate   SpecBound's exit layer and temperatures, stored beside the model (cmsd.selfspec.calibrate)
    distill     a small drafter built from the target and trained on its own predictions (cmsd.distill), with
                held-out rows, resumable stages and a model card
"""
