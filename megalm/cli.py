"""The ``megalm`` command: train, prepare, generate, config show, quickstart, bench.

Errors a user can fix (config, data, checkpoint) print one line saying what is wrong and exit
non-zero (2 for config errors) instead of a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from megalm.config import load_config
from megalm.errors import exit_code, MegalmError, one_line, prefix, say

log = logging.getLogger("megalm")


def _setup_logging() -> None:
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"{prefix()}: %(message)s", stream=sys.stderr, force=True)
    # DeepSpeed logs every engine detail at INFO; keep its warnings only.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def cmd_train(args) -> int:
    from megalm.train.trainer import train

    return train(load_config(args.config, args.overrides)).report()


def cmd_prepare(args) -> int:
    from megalm.data.prepare import prepare

    config, overrides = args.config, args.overrides
    if config is not None and "=" in config:  # `megalm prepare data.source=...`: no run file given
        config, overrides = None, [config, *overrides]
    prepare(load_config(config, overrides).data, force=args.force)
    return 0


def cmd_config_show(args) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_generate(args) -> int:
    from megalm.generate import generate_text

    text = generate_text(args.path, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device)
    print(text)
    return 0


def cmd_quickstart(args) -> int:
    """Prepare python-stdlib, train the tiny model, report loss vs unigram entropy, sample."""
    from megalm.generate import generate_text
    from megalm.train.trainer import train

    t0 = time.time()
    cfg = load_config("quickstart", args.overrides)
    summary = train(cfg)
    if summary.stopped:
        return summary.report()
    prompt = "def main():\n    "
    sample = generate_text(summary.run_dir, prompt, max_tokens=80, temperature=0.8, top_k=50, top_p=0.95, seed=0)
    bits = 1 / 0.6931471805599453
    print("\n" + "=" * 72)
    print(f"quickstart finished in {time.time() - t0:.0f}s ({summary.steps} steps, {summary.tokens:,} tokens)")
    print(f"  validation loss     {summary.val_loss:.3f} nats/token  (perplexity {summary.val_ppl:.1f})")
    print(f"  unigram entropy     {summary.unigram_entropy_nats:.3f} nats/token  "
          f"(a model that ignores context can do no better)")
    print(f"  gain from context   {summary.unigram_entropy_nats - summary.val_loss:.3f} nats/token "
          f"({(summary.unigram_entropy_nats - summary.val_loss) * bits:.2f} bits)")
    print(f"  run dir             {summary.run_dir}  (metrics.jsonl, loss.png, checkpoints/)")
    print(f"  sample (prompt {prompt!r}):\n" + "-" * 72 + f"\n{sample}\n" + "-" * 72)
    print(f"more text: megalm generate {summary.run_dir} --prompt 'import os'")
    return 0


def cmd_ckpt(args) -> int:
    """Inspect, verify and convert checkpoints."""
    from pathlib import Path

    from megalm.checkpoint import catalog, hf
    from megalm.checkpoint.meta import CheckpointMeta
    from megalm.errors import CheckpointError

    if args.ckpt_command == "list":
        rows = catalog.listing(args.run_dir, checksums=not args.quick)
        print(f"{'checkpoint':<22} {'step':>8} {'size':>10}  {'layout':<24} status")
        for r in rows:
            step = "-" if r.step is None else r.step
            print(f"{r.path.name:<22} {step:>8} {r.bytes / 1e6:>8.1f}MB  {r.layout:<24} {r.status}")
        return 0
    if args.ckpt_command == "verify":
        path = Path(args.path)
        checkpoints = [path] if (path / CheckpointMeta.FILE).is_file() else \
            catalog.complete_checkpoints(catalog.checkpoint_root(path))
        if not checkpoints:
            raise CheckpointError(f"{path}: no complete checkpoint to verify")
        failed = 0
        for ckpt in checkpoints:
            try:
                meta = catalog.verify(ckpt)
                print(f"ok      {ckpt}  (step {meta.step}, {len(meta.files)} files, sizes and xxh3 checksums match)")
            except CheckpointError as e:
                failed += 1
                print(f"FAILED  {ckpt}: {e}")
        return 1 if failed else 0
    if args.ckpt_command == "export":
        ckpt = catalog.resolve(args.ckpt)
        export = hf.export_hf if args.format == "hf" else hf.export_torch
        out = export(ckpt, Path(args.out), force=args.force)
        print(f"exported {ckpt} as {args.format} to {out}")
        return 0
    out = hf.import_hf(Path(args.hf_dir), Path(args.out), pad_vocab=args.pad_vocab)
    print(f"imported {args.hf_dir} to {out}; train from it with train.resume={out} model={out / 'model.yaml'} "
          f"and data prepared with data.tokenizer={out / 'tokenizer.json'}")
    return 0


def cmd_eval(args) -> int:
    from megalm.evaluation import main

    return main(args)


def cmd_finetune(args) -> int:
    if args.task == "lm":
        from megalm.finetune.lm import main
    else:
        from megalm.finetune.classify import main
    return main(args)


def cmd_classify(args) -> int:
    from megalm.finetune.predict import main

    return main(args)


def cmd_finetune_example(args) -> int:
    from megalm.finetune.example import main

    return main(args)


def cmd_plan(args) -> int:
    from megalm.plan.report import main

    return main(args)


def cmd_slurm(args) -> int:
    from megalm.cluster import slurm

    return slurm.submit(args.rest)


def cmd_plot(args) -> int:
    from megalm.observe.plot import DEFAULT_METRICS, plot_bench, plot_runs

    if args.bench:
        try:
            print(plot_bench(Path(args.bench), args.out and Path(args.out)))
        except ValueError as e:
            say(f"megalm: error: {e}")
            return 1
        return 0
    if not args.run_dirs:
        say("megalm: error: give run directories, or --bench RESULTS.json")
        return 2
    out = plot_runs([Path(d) for d in args.run_dirs], args.metric or DEFAULT_METRICS, Path(args.out or "runs.png"))
    if out is None:
        say(f"megalm: error: none of {args.run_dirs} logged any of {args.metric or DEFAULT_METRICS}")
        return 1
    print(out)
    return 0


def cmd_bench(args) -> int:
    if args.what == "kernels":
        from megalm_kernels import bench

        return bench.main(args.rest)
    from megalm.bench import ckpt, data, train

    return {"ckpt": ckpt, "data": data, "train": train}[args.what].main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalm", description="Pretrain GPT-style language models.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, required=True):
        sp.add_argument("config", nargs=None if required else "?",
                        help="run YAML (e.g. configs/quickstart.yaml) or the name of a shipped run (quickstart)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 model.n_layers=2")

    sp = sub.add_parser("train", help="train a model (plain process, or under torchrun for data parallel)")
    with_config(sp)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("prepare", help="clean and tokenize data.source (text, jsonl, parquet, a saved HF dataset) "
                                        "into webdataset shards; an interrupted run resumes when run again")
    with_config(sp, required=False)
    sp.add_argument("--force", action="store_true", help="replace an existing prepared directory")
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("config", help="inspect configs")
    csub = sp.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    with_config(show)
    show.set_defaults(func=cmd_config_show)

    sp = sub.add_parser("generate", help="sample text from a run dir or checkpoint")
    sp.add_argument("path", help="run dir, its checkpoints/ dir, or one checkpoint dir")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-tokens", type=int, default=100)
    sp.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    sp.add_argument("--top-k", type=int, default=50, help="0 disables")
    sp.add_argument("--top-p", type=float, default=0.95, help="1.0 disables")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("quickstart", help="prepare python-stdlib, train the tiny model, sample from it")
    sp.add_argument("overrides", nargs="*", help="dotted overrides of the shipped quickstart run")
    sp.set_defaults(func=cmd_quickstart)

    sp = sub.add_parser("ckpt", help="list, verify, export and import checkpoints")
    csub = sp.add_subparsers(dest="ckpt_command", required=True)
    c = csub.add_parser("list", help="every checkpoint of a run: step, size, layout, verified or why not")
    c.add_argument("run_dir")
    c.add_argument("--quick", action="store_true", help="check sizes only, not checksums")
    c = csub.add_parser("verify", help="check sizes and checksums of a checkpoint (or of all of a run's); exit 1 if bad")
    c.add_argument("path", help="a checkpoint directory or a run dir")
    c = csub.add_parser("export", help="write a checkpoint as a Hugging Face model directory or one torch file")
    c.add_argument("ckpt", help="a checkpoint directory or a run dir (its newest checkpoint)")
    c.add_argument("out")
    c.add_argument("--format", choices=["hf", "torch"], default="hf",
                   help="hf: safetensors + config.json + tokenizer (transformers loads it); torch: one .pt file")
    c.add_argument("--force", action="store_true",
                   help="write into a directory that holds files (hf), or replace an existing file (torch)")
    c = csub.add_parser("import", help="turn a Hugging Face GPT-2 or Llama directory into a megalm checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out")
    c.add_argument("--pad-vocab", type=int, default=1,
                   help="round the vocabulary up to a multiple of this (e.g. 128, for tensor parallelism)")
    for parser in csub.choices.values():
        parser.set_defaults(func=cmd_ckpt)

    sp = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint on a prepared directory's "
                                     "held-out split (any layout; under torchrun for several processes)")
    sp.add_argument("ckpt", help="a run dir (its newest checkpoint) or a checkpoint directory")
    sp.add_argument("--data", required=True, help="a prepared data directory (made with the checkpoint's tokenizer)")
    sp.add_argument("--json", help="also write the results to this JSON file")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 train.micro_batch_size=4 "
                                                 "data.eval_sequences=256 (default: the whole validation split)")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("finetune", help="adapt a checkpoint: classification (--task classify) or continued "
                                         "pretraining on a domain corpus (--task lm)")
    sp.add_argument("ckpt", help="a run dir (its newest checkpoint), a checkpoint directory, or an imported model")
    sp.add_argument("--task", choices=["classify", "lm"], required=True)
    sp.add_argument("--data", help="lm: a prepared data directory (prepared with the checkpoint's tokenizer)")
    sp.add_argument("--train", help="classify: a .jsonl file of {text, label} records to train on")
    sp.add_argument("--eval", help="classify: a .jsonl file of {text, label} records to score")
    sp.add_argument("--keep-optimizer", action="store_true",
                    help="lm: continue the checkpoint's Adam moments and step count, so the LR schedule goes on from "
                         "its step (train.steps is then the step to end at), instead of fresh ones")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 train.run_dir=runs/ft")
    sp.set_defaults(func=cmd_finetune)

    sp = sub.add_parser("classify", help="predict labels with a fine-tuned classifier (megalm finetune --task classify)")
    sp.add_argument("run_dir", help="the fine-tuning run dir (or one of its checkpoints)")
    sp.add_argument("--text", action="append", help="a text to classify (repeatable)")
    sp.add_argument("--input", help="a .jsonl file of {text} records; predictions go to stdout as jsonl")
    sp.add_argument("--device", default="cpu")
    sp.set_defaults(func=cmd_classify)

    sp = sub.add_parser("finetune-example", help="write train.jsonl and eval.jsonl for --task classify: chunks of "
                                                 "standard-library sources labelled by package (email, asyncio, "
                                                 "multiprocessing), evaluation files unseen in training")
    sp.add_argument("out_dir")
    sp.add_argument("--min-chars", type=int, default=400, help="shortest chunk (whole lines)")
    sp.add_argument("--max-chars", type=int, default=800, help="longest chunk")
    sp.add_argument("--max-per-class", type=int, default=0,
                    help="at most this many training chunks per label, a quarter as many for evaluation (0: all)")
    sp.set_defaults(func=cmd_finetune_example)

    sp = sub.add_parser("slurm", help="run on a Slurm cluster: megalm slurm submit CONFIG --nodes N ...")
    sp.add_argument("action", choices=["submit"])
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="see megalm slurm submit --help")
    sp.set_defaults(func=cmd_slurm)

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
    sp.add_argument("--efficiency", type=float, default=0.5, help="share of the dense peak the matmuls reach")
    sp.add_argument("--intra-node-gbs", type=float, default=0.0, help="GB/s per GPU per direction in a node "
                                                                      "(default: the GPU's NVLink/PCIe)")
    sp.add_argument("--inter-node-gbs", type=float, default=0.0, help="GB/s per GPU per direction between nodes "
                                                                      "(default: 50, 25 for A100/L40S)")
    sp.add_argument("--vocab", type=int, default=50304, help="vocabulary size when the config leaves it to the tokenizer")
    sp.add_argument("--top", type=int, default=10, help="layouts shown")
    sp.add_argument("--json", help="also write every layout's estimate and inputs to this file")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("plot", help="curves of several runs on one figure (loss, throughput, MFU, memory)")
    sp.add_argument("run_dirs", nargs="*", help="run directories (each with metrics.jsonl)")
    sp.add_argument("--bench", help="instead: a megalm bench train or kernels results JSON, drawn beside it (or to "
                                    "--out): bars per variant, or throughput by size per op")
    sp.add_argument("--metric", action="append", help="a metrics.jsonl field to plot (repeatable; default: loss, "
                                                      "tokens_per_s, mfu, mem_peak_gb)")
    sp.add_argument("--out", help="the PNG to write (default: runs.png; with --bench, beside the results)")
    sp.set_defaults(func=cmd_plot)

    sp = sub.add_parser("bench", help="benchmarks (results go to benchmarks/results/)")
    sp.add_argument("what", choices=["kernels", "ckpt", "data", "train"])
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that benchmark")
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so overrides after options
    # (`megalm finetune CKPT --task classify ... train.steps=50`) come back unparsed
    if extra and (not hasattr(args, "overrides") or any(item.startswith("-") for item in extra)):
        parser.parse_args(argv)  # argparse's own message and exit
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (MegalmError, OSError) as e:  # an OSError names its file: say it, no traceback
        say(f"{prefix()}: {one_line(e)}")
        return exit_code(e)
    except KeyboardInterrupt as e:  # what was interrupted has said what it kept (prepare: the work so far)
        say(f"{prefix()}: {one_line(e)}")
        return exit_code(e)

if __name__ == "__main__":
    sys.exit(main())
