"""Writes the embedded toy SFT data set (sorting), shipped as data/sort_train.jsonl and data/sort_eval.jsonl.

Why sorting: the golden answer y of every prompt x is checkable by exact match, so a CPU run can show
whether LD-Align moves the policy towards D (the paper's premise: y in D is a golden label, Section 4.2.2)
without a reward model or GPT-4. Records use the UltraChat 200k layout (`prompt`, `messages`), so the
same loader reads the toy data and the paper's data: (x, y) = first user turn, first assistant turn.

    python data/make_sort.py      # rewrites both files, byte for byte the same (seeded)
"""
import json
import os
import random


def make_records(n, rng, seen):
    out = []
    while len(out) < n:
        nums = [rng.randrange(100) for _ in range(rng.randint(3, 7))]
        x = "sort: " + " ".join(map(str, nums))
        if x in seen:  # held-out prompts never appear in the training set
            continue
        seen.add(x)
        y = " ".join(map(str, sorted(nums)))
        out.append({"prompt": x, "messages": [{"role": "user", "content": x}, {"role": "assistant", "content": y}]})
    return out


def main():
    rng, seen = random.Random(0), set()
    here = os.path.dirname(os.path.abspath(__file__))
    for name, n in (("sort_eval.jsonl", 200), ("sort_train.jsonl", 8000)):
        with open(os.path.join(here, name), "w") as f:
            for r in make_records(n, rng, seen):
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
