"""Training: optimizer, loss, sharded train step, checkpoints, metrics, and the loop."""
