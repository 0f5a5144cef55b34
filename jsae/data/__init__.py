"""Activation data: the source contract, synthetic ground truth, shards on disk, text."""
