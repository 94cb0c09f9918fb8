"""data/world package."""
