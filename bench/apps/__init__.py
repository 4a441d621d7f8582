"""Minimal apps that every benchmarked server serves identically."""
