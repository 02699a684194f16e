"""Evaluation: each task's standard metric on the standard result formats."""
