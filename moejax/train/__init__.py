"""Training: the step, the train state, the loop, optimizer and schedules, checkpoints, workdir ownership, metrics, held-out scoring and the result record."""
