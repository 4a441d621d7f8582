"""forkd's benchmark suite: see bench/README.md (nothing here is imported by forkd)."""
