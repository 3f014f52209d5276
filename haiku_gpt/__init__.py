"""haiku_gpt: a small, exact, fast GPT trainer in JAX and Haiku."""
