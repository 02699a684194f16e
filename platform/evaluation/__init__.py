"""Evaluation: the task table, scoring on val shards, prediction to the public result formats, the metrics."""
