"""Unit tests: no network, no servers; fast."""
