"""Tokenization throughput: data.sharded.tokenize_sharded at 1, 2, ... worker processes.

    python bench/tokenize_speed.py [--workers 1,2] [--repeat 8] [--rounds 3] [--batch-chars 262144]
                             [--inputs data/corpus/shakespeare.jsonl] [--tokenizer mistral-v1]

Each run tokenizes `--repeat` copies of the inputs (the shipped Shakespeare corpus by default: 15 plays,
640k Mixtral tokens per copy) into a sharded dataset and times all of tokenize_sharded: the input check
(one read of every input), the worker processes' start (spawn: each imports numpy and tokenizers and
builds its tokenizer), encoding and writing. tokens/s = tokens written / those seconds; each worker count
keeps its best of `--rounds` rounds (the rounds alternate the order; on a shared machine the best is the
least disturbed). The load average before the runs says how busy the machine was; the CPU seconds of
all processes (the workers counted once joined) show the work itself, which contention does not
inflate as much as the wall time. The output bytes are checked to be the same at every worker count.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from data.sharded import open_dataset, tokenize_sharded  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402


def digest(prefix: str) -> str:
    h = hashlib.sha256()
    for shard in open_dataset(prefix).shards:
        h.update(Path(f"{shard.prefix}.bin").read_bytes() + Path(f"{shard.prefix}.idx").read_bytes())
    return h.hexdigest()[:12]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers, once joined)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--repeat", type=int, default=8, help="copies of the inputs per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-chars", type=int, default=1 << 18, help="characters per worker task")
    parser.add_argument("--inputs", nargs="+", default=[str(ROOT / "data/corpus/shakespeare.jsonl")])
    parser.add_argument("--tokenizer", default="mistral-v1")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    tokenizer = load_tokenizer(args.tokenizer)
    inputs = args.inputs * args.repeat
    print(f"cores usable: {len(os.sched_getaffinity(0))}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.repeat} x {', '.join(args.inputs)}")
    best, digests = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for w in workers if r % 2 == 0 else workers[::-1]:
                prefix = f"{tmp}/w{w}"
                t0, c0 = time.perf_counter(), cpu_seconds()
                stats = tokenize_sharded(inputs, prefix, tokenizer, num_workers=w, batch_chars=args.batch_chars)
                seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                print(f"round {r} workers {w}: {stats['tokens']} tokens in {seconds:.2f} s = "
                      f"{stats['tokens'] / seconds:,.0f} tokens/s; {cpu:.2f} CPU s in all processes", flush=True)
                if stats["tokens"] / seconds > best.get(w, (0.0,))[0]:
                    best[w] = (stats["tokens"] / seconds, cpu)
                digests[w] = digest(prefix)
    print("\n| workers | tokens/s (best of rounds) | vs 1 worker | CPU s of that run (all processes) |\n"
          "|---|---|---|---|")
    for w in workers:
        ratio = f"{best[w][0] / best[1][0]:.2f}x" if 1 in best else "-"
        print(f"| {w} | {best[w][0]:,.0f} | {ratio} | {best[w][1]:.2f} |")
    same = len(set(digests.values())) == 1
    print(f"\noutput identical at every worker count: {same} (sha256 {digests[workers[0]]})")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
