"""Hostile adapter corpus (``attacks``) and fuzz harness for the untrusted-adapter parser."""
