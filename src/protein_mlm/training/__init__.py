"""Training: the LightningModule, the update window, LR schedules, callbacks, checkpoints."""
