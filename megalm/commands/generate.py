"""``megalm generate PATH --prompt TEXT``: sample text from a run's newest checkpoint (or one checkpoint)."""


def add(sub) -> None:
    sp = sub.add_parser("generate", help="sample text from a run dir or checkpoint")
    sp.add_argument("path", help="run dir, its checkpoints/ dir, or one checkpoint dir")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-tokens", type=int, default=100)
    sp.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    sp.add_argument("--top-k", type=int, default=50, help="0 disables")
    sp.add_argument("--top-p", type=float, default=0.95, help="1.0 disables")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu")
    sp.set_defaults(func=run)


def run(args) -> int:
    from megalm.sampling import generate_text

    print(generate_text(args.path, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device))
    return 0
