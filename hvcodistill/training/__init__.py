"""Training: losses and schedules (pure functions), evaluation, checkpoints and run outputs.
The loop itself is `train()` in hvcodistill/train.py, the entry point."""
