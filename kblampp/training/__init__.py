"""Stage A (retrieval on cached states, copy gate, value warm-up, end to end) and Stage B training."""
