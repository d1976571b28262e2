"""Interoperability with other toolkits (optional extras)."""
