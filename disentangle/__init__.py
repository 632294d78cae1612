"""disentangle package."""
