"""Data for training: rows (load), token ids with loss masks (tokenize), padded batches (batch)."""
