"""Datasets: read records, render them with the model's chat template, mask the prompt."""
