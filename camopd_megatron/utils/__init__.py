"""Small shared utilities: rank-aware logging, metrics writers."""
