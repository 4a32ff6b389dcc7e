"""End-to-end tests against a real llama-server (skipped unless RUN_LLM_TESTS=1)."""
