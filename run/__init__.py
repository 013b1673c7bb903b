"""What a run needs that is not the paper: the run folder and its resume (rundir.py), the command line and user
errors (cli.py), what each setting accepts (options.py), step checkpoints and SIGTERM (checkpoint.py), and LoRA
for one GPU (lora.py). The paper's files (guide.py, dpo.py, generate.py) import none of it; stages.py and
ldalign.py use it."""
