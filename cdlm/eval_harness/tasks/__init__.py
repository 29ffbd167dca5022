"""Built-in tasks, one module each; the registry is ``cdlm.eval_harness.task`` (``get_task``, ``register_task``)."""
