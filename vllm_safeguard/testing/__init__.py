"""Test and demo infrastructure shipped with the package: tiny random Llama models and adapters
(``tiny``), a complete tiny workspace (``workspace``), the attack corpora (``attacks``,
``evasions``) and the one helper that starts a vLLM server for tests, benchmarks and the demo
(``server``)."""
