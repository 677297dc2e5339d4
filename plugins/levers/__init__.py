"""First-party levers."""
