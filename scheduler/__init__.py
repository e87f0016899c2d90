"""Expert-cache bookkeeping and scheduling: which expert lives in which device slot, what to evict,
what to fetch next. Knows experts as (layer, expert) keys and slots as ints; never imports the model,
attention or JAX device code (the runtime in `jaxmoe.offload` performs the actual copies).
"""
