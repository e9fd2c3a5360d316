"""Reusable hypothesis strategies and state machines for testing checkpoint algorithms."""
