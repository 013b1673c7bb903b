"""Writes the embedded toy SFT data set (sorting), shipped as data/sort_train.jsonl and data/sort_eval.jsonl.

Also writes data/sort_pairs.jsonl: annotated preference pairs for `--method dpo` (the paper's DPO baseline
trains on UltraFeedback binarized; this file has its layout: prompt, chosen and rejected message lists). The
chosen answer is golden, the rejected one a corrupted copy (a number dropped, repeated or two swapped), for the
same 2,000 prompts that LD-Align uses as D.

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


def corrupt(y, rng):
    """A plausible wrong answer: the mistakes a weak sorting model makes (drop, repeat, swap)."""
    nums = y.split()
    kind = rng.choice(["drop", "repeat", "swap"])
    if kind == "drop" or len(set(nums)) == 1:
        del nums[rng.randrange(len(nums))]
    elif kind == "repeat":
        i = rng.randrange(1, len(nums))
        nums[i] = nums[i - 1] if nums[i] != nums[i - 1] else nums[0]
    else:
        i = rng.randrange(len(nums) - 1)
        while nums[i] == nums[i + 1]:
            i = (i + 1) % (len(nums) - 1)
        nums[i], nums[i + 1] = nums[i + 1], nums[i]
    out = " ".join(nums)
    return out if out != y else " ".join(y.split()[:-1])


def main():
    rng, seen = random.Random(0), set()
    here = os.path.dirname(os.path.abspath(__file__))
    for name, n in (("sort_eval.jsonl", 200), ("sort_train.jsonl", 8000)):
        recs = make_records(n, rng, seen)
        with open(os.path.join(here, name), "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    prng = random.Random(1)
    with open(os.path.join(here, "sort_pairs.jsonl"), "w") as f:
        for r in recs[:2000]:
            x, y = r["messages"][0]["content"], r["messages"][1]["content"]
            user = {"role": "user", "content": x}
            f.write(json.dumps({"prompt": x, "chosen": [user, {"role": "assistant", "content": y}],
                                "rejected": [user, {"role": "assistant", "content": corrupt(y, prng)}]}) + "\n")


if __name__ == "__main__":
    main()
