"""Tools that run beside Algorithm 1, not in it: the memory plan (plan.py, `python ldalign.py --plan`), the GPU
benchmark (bench.py) and the paper's Table 1 with lm-evaluation-harness (harness.py, `bash train.sh eval`).
Each runs from the repository root as `python tools/<name>.py` or `python -m tools.<name>`."""
