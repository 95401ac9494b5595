"""Domains: named datasets, their readers, and batch iterators for the training loop."""
