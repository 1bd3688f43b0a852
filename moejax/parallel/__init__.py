"""Meshes, expert parallelism, multi-process runs and compile targets."""
