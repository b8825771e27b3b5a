"""Benchmarks of sgdprobe side by side with the tools a user would otherwise pick (see BENCHMARKS.md)."""
