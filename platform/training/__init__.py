"""Training: clips and batches, the loop and its hooks (the TAG probe among them), one run on Ray Train or in process."""
