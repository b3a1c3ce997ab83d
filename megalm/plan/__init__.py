"""Planning a run before renting the cluster: per-GPU memory and step time of every parallel layout
of a model on N GPUs, ranked (``megalm plan``).

- ``hardware``: GPU types (memory, link speeds; peaks from megalm.observe.flops) and the cluster;
- ``layout``: the layouts megalm accepts (tp, pp, dp, micro-batch, ZeRO stage, checkpointing, SP);
- ``memory``: what one GPU holds at the step's peak, from megalm's layers and DeepSpeed's optimizer
  paths (checked against measured CPU runs in tests/test_plan.py);
- ``step_time``: compute at a stated efficiency, pipeline bubble, communication over stated links;
- ``report``: the ranking, the formulas' inputs for the best layout, and the overrides that run it.
"""
