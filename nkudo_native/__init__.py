"""Compiled hot paths of nkudo.

Nothing here is imported directly by application code: ``nkudo._native`` loads
each module, falls back to its pure-Python twin, and records why.
"""
