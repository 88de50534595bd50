"""Training drafters, apart from the decode-time library (which imports nothing from here):

    data        the teacher's data: the target's continuations and next-token distributions, the draft vocabulary
    loop        the training loop both kinds share: settings, AdamW with warm-up and cosine decay, checkpoints
    distill     a drafter distilled from the target (its first layers and last), held-out check, its directory
    head        a feature head: EAGLE's losses, held-out check, its directory
    calibrate   SpecBound's calibration fit (exit temperatures, exit layer and k)

`cmsd-jobs distill` and `cmsd-jobs calibrate` (jobs/train) drive them: stages, resume, progress, model cards.
"""
