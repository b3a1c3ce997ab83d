"""Planning a run before renting the cluster: per-GPU memory and step time of every parallel layout
of a model on N GPUs, ranked (``megalm plan``).

- ``hardware``: GPU types (memory, memory bandwidth, link speeds, the share of the peak their best
  matmuls reach; peaks from megalm.observe.flops), NCCL's achieved link shares, and the cluster;
- ``layout``: the layouts megalm accepts (tp, pp, dp, micro-batch, ZeRO stage, checkpointing, SP);
- ``memory``: what one GPU holds at the step's peak, from megalm's layers and DeepSpeed's optimizer
  and pipeline paths (checked against measured CPU runs in tests/test_plan.py);
- ``matmuls``: each matmul of a block and the head, and the share of the peak its shape reaches;
- ``step_time``: matmuls at those shares, memory-bound kernels, pipeline bubble and per-micro-batch
  latency, communication over the links each group really crosses;
- ``report``: the ranking, the formulas' inputs for the best layout, and the overrides that run it;
- ``published``: Megatron-LM's published runs (Narayanan et al. 2021, Table 1), which the step time
  is held to within 15% (tests/test_plan.py) and which fix its one fitted number.
"""
