"""First-party adversarial objectives."""
