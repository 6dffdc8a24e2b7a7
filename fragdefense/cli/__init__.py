"""Command-line entry points (thin Hydra shells around plain, testable functions)."""
