"""Stage 1, data: corpus reading, the tokenizer, MMIDIDX shards and their manifest, the packed dataset."""
