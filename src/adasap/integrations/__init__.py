"""Bridges to training frameworks; each module needs its framework (an optional extra)."""
