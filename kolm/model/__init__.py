"""Stage 2, model: Phi shapes and configs, parameter and FLOP counts, the loss."""
