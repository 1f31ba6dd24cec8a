"""llmjax: every stage of LLM training as pure JAX functions."""
