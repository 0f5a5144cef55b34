"""Language models in JAX (Gemma 2, Gemma 3) with named hook sites, and their weights."""
