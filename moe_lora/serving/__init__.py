"""Serving a trained bank over HTTP (see docs/serving.md)."""
