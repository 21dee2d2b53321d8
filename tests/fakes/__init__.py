"""Fake upstream providers on 127.0.0.1, one module per provider kind, speaking its wire format."""
