"""Evaluating an adapter: loss and ROUGE on an eval set (evaluator), greedy decoding (generate)."""
