"""Stage 3, training: the run config, DeepSpeed engine and launcher environment, checkpoints,
signals, metrics, the training loop, and the memory/time planner."""
