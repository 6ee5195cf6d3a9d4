"""Tests of the hostile adapter corpora (``vllm_safeguard.testing.attacks`` / ``.evasions``) and the fuzz harness for the untrusted-adapter parser."""
