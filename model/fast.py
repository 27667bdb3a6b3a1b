"""Faster-training nets under the seed's rules (filled in by the time-to-85% work)."""
