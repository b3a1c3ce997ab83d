"""``megalm plan CONFIG --gpus N``: every parallel layout of a model on N GPUs, with its memory per GPU
and step time, ranked (megalm/plan/)."""


def add(sub) -> None:
    sp = sub.add_parser("plan", help="estimate per-GPU memory and step time of every parallel layout of a model "
                                     "on N GPUs, and rank them")
    sp.add_argument("config", help="run YAML, shipped run, or model preset (gpt2-125m, gpt-1.3b, ...)")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.precision=bf16 model.n_layers=32")
    sp.add_argument("--gpu", default="h100-sxm", help="GPU type: a100-40gb, a100-80gb, h100-sxm, h100-pcie, h200, "
                                                      "b200, l40s")
    sp.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    sp.add_argument("--gpus-per-node", type=int, default=8)
    sp.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: data.seq_len)")
    sp.add_argument("--global-batch", type=int, default=0, help="sequences per step (default: train.global_batch)")
    sp.add_argument("--efficiency", type=float, default=None,
                    help="one share of the dense peak for every matmul, replacing the per-GPU table that gives "
                         "each matmul its own from its shape (default: the table)")
    sp.add_argument("--intra-node-gbs", type=float, default=0.0, help="achieved GB/s per GPU per direction in a "
                                                                      "node (default: the GPU's NVLink/PCIe x 0.7)")
    sp.add_argument("--inter-node-gbs", type=float, default=0.0, help="achieved GB/s per GPU per direction between "
                                                                      "nodes (default: 50, 25 for A100/L40S, x 0.9)")
    sp.add_argument("--vocab", type=int, default=50304, help="vocabulary size when the config leaves it to the tokenizer")
    sp.add_argument("--top", type=int, default=10, help="layouts shown")
    sp.add_argument("--json", help="also write every layout's estimate and inputs to this file")
    sp.set_defaults(func=run)


def run(args) -> int:
    from megalm.plan.report import main

    return main(args)
