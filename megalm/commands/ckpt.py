"""``megalm ckpt list|verify|export|import``: inspect, verify and convert checkpoints."""

from pathlib import Path


def add(sub) -> None:
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
        parser.set_defaults(func=run)


def run(args) -> int:
    return {"list": listing, "verify": verify, "export": export, "import": import_hf}[args.ckpt_command](args)


def listing(args) -> int:
    from megalm.checkpoint import catalog

    rows = catalog.listing(args.run_dir, checksums=not args.quick)
    print(f"{'checkpoint':<22} {'step':>8} {'size':>10}  {'layout':<24} status")
    for r in rows:
        step = "-" if r.step is None else r.step
        print(f"{r.path.name:<22} {step:>8} {r.bytes / 1e6:>8.1f}MB  {r.layout:<24} {r.status}")
    return 0


def verify(args) -> int:
    from megalm.checkpoint import catalog
    from megalm.checkpoint.meta import CheckpointMeta
    from megalm.errors import CheckpointError

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


def export(args) -> int:
    from megalm.checkpoint import catalog, hf

    ckpt = catalog.resolve(args.ckpt)
    write = hf.export_hf if args.format == "hf" else hf.export_torch
    out = write(ckpt, Path(args.out), force=args.force)
    print(f"exported {ckpt} as {args.format} to {out}")
    return 0


def import_hf(args) -> int:
    from megalm.checkpoint import hf

    out = hf.import_hf(Path(args.hf_dir), Path(args.out), pad_vocab=args.pad_vocab)
    print(f"imported {args.hf_dir} to {out}; train from it with train.resume={out} model={out / 'model.yaml'} "
          f"and data prepared with data.tokenizer={out / 'tokenizer.json'}")
    return 0
