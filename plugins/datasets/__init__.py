"""First-party datasets."""
