"""``megalm quickstart``: prepare the Python standard library, train the tiny model, report its loss
against the corpus's unigram entropy, and sample from it."""

import math
import time


def add(sub) -> None:
    sp = sub.add_parser("quickstart", help="prepare python-stdlib, train the tiny model, sample from it")
    sp.add_argument("overrides", nargs="*", help="dotted overrides of the shipped quickstart run")
    sp.set_defaults(func=run)


def run(args) -> int:
    from megalm.config import load_config
    from megalm.sampling import generate_text
    from megalm.train.trainer import train

    t0 = time.time()
    summary = train(load_config("quickstart", args.overrides))
    if summary.stopped:
        return summary.report()
    prompt = "def main():\n    "
    sample = generate_text(summary.run_dir, prompt, max_tokens=80, temperature=0.8, top_k=50, top_p=0.95, seed=0)
    gain = summary.unigram_entropy_nats - summary.val_loss
    print("\n" + "=" * 72)
    print(f"quickstart finished in {time.time() - t0:.0f}s ({summary.steps} steps, {summary.tokens:,} tokens)")
    print(f"  validation loss     {summary.val_loss:.3f} nats/token  (perplexity {summary.val_ppl:.1f})")
    print(f"  unigram entropy     {summary.unigram_entropy_nats:.3f} nats/token  "
          f"(a model that ignores context can do no better)")
    print(f"  gain from context   {gain:.3f} nats/token ({gain / math.log(2):.2f} bits)")
    print(f"  run dir             {summary.run_dir}  (metrics.jsonl, loss.png, checkpoints/)")
    print(f"  sample (prompt {prompt!r}):\n" + "-" * 72 + f"\n{sample}\n" + "-" * 72)
    print(f"more text: megalm generate {summary.run_dir} --prompt 'import os'")
    return 0
