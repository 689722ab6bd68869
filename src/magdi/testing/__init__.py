"""Helpers shared by the tests and the reliability benchmark (``benchmarks/reliability.py``): a fake
OpenAI-compatible teacher on loopback that fails on demand (``faults``), a loopback HTTP server context
(``loopback``) and a tiny student for kill-and-resume runs. Not used by the pipeline itself."""
