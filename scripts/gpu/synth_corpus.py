#!/usr/bin/env python3
"""A larger synthetic BEIR corpus for scripts/gpu-check: documents of 40-220 words drawn
(seeded) from the word stream of a real corpus, so their token statistics are realistic.
Usage: synth_corpus.py SOURCE_CORPUS.jsonl COUNT OUT.jsonl [SEED]"""
import json
import random
import sys


def main():
    source, count, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else 7)
    words = []
    with open(source) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                words.extend((d.get("title", "") + " " + d.get("text", "")).split())
    if not words:
        sys.exit(f"{source}: no words")
    with open(out, "w") as f:
        for i in range(count):
            n = rng.randint(40, 220)
            start = rng.randrange(len(words))
            # A run of real text, then words drawn at random: locally fluent, globally new.
            run = words[start:start + n // 2]
            body = run + [rng.choice(words) for _ in range(n - len(run))]
            title = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
            f.write(json.dumps({"_id": f"syn{i}", "title": title, "text": " ".join(body)}) + "\n")


if __name__ == "__main__":
    main()
