"""SGLang adapters: the pinned radix cache, the scheduler adapter, the attention backend, and
BatchLLM's stats and metrics. These import SGLang; the pure core is in `planner/` and `policy/`."""
