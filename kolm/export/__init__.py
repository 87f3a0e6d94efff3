"""Stage 4, export: checkpoints to Hugging Face directories, generation and evaluation."""
