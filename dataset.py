"""The data of Algorithm 1: D = {(x_i, y_i)}, held-out prompts and preference pairs, read, checked, tokenized.

    data = dataset.load(cfg, run)     # every record checked before any compute; errors name file:line
    data.D, data.held_out, data.pref  # lists of dicts with the policy's (px, py) and the guide's (gx, gy) token ids
    data.sft                          # (--method sft --sft_data FILE) continual SFT's (px, py), None: D
    data.tok, data.gtok               # the policy's tokenizer (its chat template) and the guide's

One function makes a prompt's tokens for generation AND training (prompt_ids); golden responses are tokenized as
they follow that prompt (response_ids). The guide reads plain text in its own tokenizer (guide_ids, guide_triples).
The embedded default's tokenizer (a byte-level BPE trained on the shipped data) and tiny configs are at the end.
"""
import gzip
import json
import os
from types import SimpleNamespace

import fsdp
from run.cli import UserError
from run.rundir import atomic_path, read_jsonl, write_jsonl


# ----------------------------------------------------------------------------------------------------
# Require: everything a run reads, checked before any compute
# ----------------------------------------------------------------------------------------------------
def load(cfg, run):
    """Require (Algorithm 1): D, the held-out prompts, the preference pairs (--method dpo), continual SFT's records
    (--method sft --sft_data), both tokenizers.

    Everything is read and checked here, before any compute: a bad line fails now, naming file:line;
    over-length records fail (--overlength error) or are listed in out/skipped.jsonl (--overlength skip).
    """
    from transformers import AutoTokenizer, GPT2Config
    tiny = cfg["policy"] == "tiny"
    for option in ("policy", "guide", "reward_model"):  # a wrong path fails now, naming the option
        if cfg[option] and cfg[option] != "tiny":
            check_model_source(option, cfg[option], cfg.get(f"{option}_revision"))
    records = load_sft_jsonl(cfg["data"], 0 if tiny else cfg["max_examples"])
    eval_records = load_sft_jsonl(cfg["eval_data"], cfg["max_eval"], "--eval_data") if cfg["eval_data"] else []
    # continual SFT's set (--method sft): D, or all the records of --sft_data ("" = of --data, uncut)
    sft_records = load_sft_jsonl(cfg["sft_data"] or cfg["data"], 0, "--sft_data") \
        if "sft" in cfg["method"].split(",") and cfg["sft_data"] != "D" else None
    if tiny:  # the embedded default: a BPE trained on the shipped data, stored in the run folder, read from there
        systems = [r["system"] for r in records if r["system"]]
        texts = [t for r in records for t in (r["x"], r["y"])] + systems
        run.cached("tokenizer", lambda: train_toy_tokenizer(texts, system=bool(systems)),
                   save=_save_tokenizer, load=lambda path: None)
        tok = AutoTokenizer.from_pretrained(run.path("tokenizer"))
    else:
        tok = AutoTokenizer.from_pretrained(cfg["policy"], trust_remote_code=cfg["trust_remote_code"],
                                            revision=cfg.get("policy_revision") or None)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked everywhere; any id will do
    if cfg["guide"] == "tiny":  # the toy guide reads the toy tokenizer's ids
        gtok, guide_src = tok, tiny_guide_config(tok, n_positions=2 * cfg["max_len"])
        cfg["guide_max_len"] = guide_src.n_positions
    else:
        revision = cfg.get("guide_revision") or None
        gtok, guide_src = AutoTokenizer.from_pretrained(cfg["guide"], revision=revision), cfg["guide"]
        cfg["guide_max_len"] = GPT2Config.from_pretrained(cfg["guide"], revision=revision).n_positions
    D, skipped = tokenize_data(records, tok, gtok, cfg, run.log)
    held_out, eval_skipped = tokenize_data(eval_records, tok, gtok, cfg, run.log, held_out=True) if eval_records \
        else ([], [])
    skipped += eval_skipped  # one skipped.jsonl for every file; each entry names its file:line
    sft_pairs = [(d["prompt_ids"], d["response_ids"]) for d in D]  # all records: the SFT set of the toy theta_0
    if cfg["max_examples"]:
        D = D[:cfg["max_examples"]]  # D of Algorithm 1: a subset, as in the paper (50k of UltraChat's 200k)
    pref = tokenize_pref(load_pref_jsonl(cfg["pref_data"], cfg["max_examples"]), tok, cfg, skipped) \
        if "dpo" in cfg["method"].split(",") else None
    sft = tokenize_sft(sft_records, tok, cfg, skipped) if sft_records else None
    if skipped and fsdp.rank() == 0:
        # every over-length record, file:line and why, once; with those earlier calls on this run folder listed
        # (another method's files: `train.sh paper-baselines` runs one method per call)
        path = run.path("skipped.jsonl")
        listed = {}
        for s in (read_jsonl(path) if os.path.exists(path) else []) + skipped:
            listed.setdefault(s["where"], s)
        write_jsonl(path, list(listed.values()))
    run.log(f"D: {len(D)} pairs from {cfg['data']}; held-out: {len(held_out)}")
    return SimpleNamespace(D=D, held_out=held_out, pref=pref, sft=sft, sft_pairs=sft_pairs, tok=tok, gtok=gtok,
                           guide_src=guide_src)


def check_model_source(option, name, revision=None):
    """--policy / --guide / --reward_model: an HF checkpoint folder, or a hub id ("gpt2", "org/model") that is in
    the Hugging Face cache or can be downloaded, at `revision` (--<option>_revision; None: the default branch).
    Raises UserError naming the option and how `name` was read."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"--{option} {name}: a folder without config.json, not a Hugging Face checkpoint folder")
        missing = missing_weights(name)
        if missing:
            raise UserError(f"--{option} {name}: {missing}")
        return
    if (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name)
            or os.sep != "/" and os.sep in name):
        raise UserError(f"--{option} {name}: no such folder (read as a local path; a hub id looks like 'org/model')")
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision or None), str):
        return  # downloaded before
    at = f" at revision {revision}" if revision else ""
    where = f"--{option} {name}: not a local folder, and not in the Hugging Face cache{at}"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{where}; HF_HUB_OFFLINE is set, so nothing is downloaded "
                        "(download it first, or give its folder)")
    import socket
    from urllib.parse import urlparse
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)  # offline: fail now, not after the hub client's retries
    except OSError:
        raise UserError(f"{where}, and {host} cannot be reached (offline?): "
                        "download it first, or give its folder") from None
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download(name, "config.json", revision=revision or None)
    except Exception as e:  # noqa: BLE001 (not found, gated, no access, ...: the hub's own words)
        raise UserError(f"{where}, and the hub says: {str(e).splitlines()[0]}") from None


# The weight files of an HF checkpoint folder: one file, or shards listed in an index
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def missing_weights(folder):
    """What an HF checkpoint folder lacks of its weights ("" if nothing): a shard its index names, or, without
    an index, the one weights file. Checked before any compute, where from_pretrained would fail later."""
    for weights in WEIGHTS:
        index = os.path.join(folder, weights + ".index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                return f"{index} cannot be read as a weights index ({type(e).__name__}: {e})"
            lost = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if lost:
                more = f" ({len(lost)} of its {len(shards)} shards are missing)" if len(lost) > 1 else ""
                return f"the weights file {os.path.join(folder, lost[0])} named in {index} is missing{more}"
            return ""
    if not any(os.path.isfile(os.path.join(folder, w)) for w in WEIGHTS):
        return f"no weights file in the folder ({' or '.join(WEIGHTS)}, or a sharded one's index)"
    return ""


def _save_tokenizer(tok, path):
    if fsdp.rank() == 0:
        with atomic_path(path) as tmp:
            tok.save_pretrained(tmp)


# ----------------------------------------------------------------------------------------------------
# JSONL: D = {(x_i, y_i)} in UltraChat's layout, preference pairs in UltraFeedback binarized's; errors name file:line
# ----------------------------------------------------------------------------------------------------
def read_records(path, what):
    """Yield (where, record) for each record of a data set, `where` naming it in errors. Shared by the SFT and the
    preference data loaders. The data set is
      a JSONL file (.jsonl, or gzipped .jsonl.gz; a UTF-8 byte-order mark is allowed): "file:line";
      a Parquet file, as UltraChat 200k and UltraFeedback binarized are downloaded (needs pyarrow): "file:row N";
      a Hugging Face hub data set "name:split" (needs the datasets package, and the machine online or the data
      set in its cache), e.g. HuggingFaceH4/ultrachat_200k:train_sft: "name:split:row N".
    """
    if path.endswith(".parquet") and os.path.isfile(path):
        yield from _parquet_records(path, what)
        return
    if not os.path.exists(path) and ":" in path and not path.startswith((".", "/", "~")):
        name = path.rsplit(":", 1)[0]
        if _looks_local(name):
            raise UserError(f"{path}: no such {what} file ({name} does not exist either; a hub data set is "
                            "given as name:split, e.g. HuggingFaceH4/ultrachat_200k:train_sft)")
        yield from _hub_records(path, what)
        return
    yield from _jsonl_records(path, what)


def _looks_local(name):
    """Is `name` (of a missing "name:split") a mistyped local path rather than a hub id ("org/name")? A data
    file's extension, a folder the path starts from, or more than one "/" (a hub id has at most one)."""
    return (name.endswith((".jsonl", ".json", ".gz", ".parquet")) or name.startswith(("data/", "./", "../"))
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def _parquet_records(path, what):
    """Yield ("file:row N", record) for each row of a Parquet file (needs pyarrow)."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow (pip install -r requirements-extra.txt)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except pyarrow.ArrowInvalid as e:
        why = str(e).splitlines()[0].replace(f"Could not open Parquet input source '{path}': ", "")
        raise UserError(f"{path}: not a Parquet file ({why})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    for i, rec in enumerate(rows, 1):
        yield f"{path}:row {i}", rec


def _hub_records(path, what):
    name, split = path.rsplit(":", 1)
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what} {path}: a hub data set (name:split) needs the datasets package "
                        "(pip install datasets); or give a local JSONL or Parquet file") from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 (offline, no such data set or split: the library's own words)
        raise UserError(f"{what} {path}: could not load the hub data set: {str(e).splitlines()[0]}") from None
    for i, rec in enumerate(rows, 1):
        yield f"{path}:row {i}", rec


def _jsonl_records(path, what):
    """Yield ("file:line", record) for each non-blank line of a JSONL file; a line that is not a JSON object raises
    UserError naming file:line."""
    if os.path.isdir(path):
        raise UserError(f"{path}: {what} is a directory; expected a JSONL file (one JSON object per line)")
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} file not found")
    jsonl = "JSONL is expected: one JSON object per line (a .json file holding a list converts with jq -c '.[]')"
    # bytes (_lines): bad UTF-8 is reported by line
    for lineno, raw in enumerate(_lines(path, what), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff") if lineno == 1 else raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry no record
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            array = lineno == 1 and line.lstrip().startswith("[")
            raise UserError(f"{where}: not valid JSON: {e.msg.removesuffix(' at')} at column {e.colno}" +
                            (f"; the file starts like a JSON array. {jsonl}" if array else "")) from None
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}. {jsonl}")
        yield where, rec


def _lines(path, what):
    """The lines of a (gzipped) file, as bytes; a file that cannot be read (no permission, an I/O error, a .gz
    that is not gzip) raises UserError naming it."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            yield from f
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None


def load_sft_jsonl(path, max_examples=0, what="--data"):
    """Read (x, y) = (first user turn, first assistant turn) of each record (JSONL, Parquet or a hub data set:
    read_records); errors name file:line (file:row N).

    A record is {"messages": [{"role": "user", "content": x}, {"role": "assistant", "content": y}, ...]}
    (UltraChat 200k's layout; later turns are ignored, as SPIN and the paper's 50k subset do), or
    {"prompt": x, "response": y}. A leading {"role": "system"} message is kept and given to the chat template for
    generation and training alike; a content may be a list of text parts ([{"type": "text", "text": ...}]).
    Returns a list of dicts {x, y, system, where} where `where` is "file:line" and system is None or a string.
    """
    out = []
    for where, rec in read_records(path, what):
        system = None
        if "messages" in rec:
            msgs = rec["messages"]
            if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
                system, msgs = _text(msgs[0].get("content"), where, "the system message"), msgs[1:]
            if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs[:2]):
                raise UserError(f"{where}: 'messages' must be a list starting with a user and an assistant turn")
            if msgs[0].get("role") != "user" or msgs[1].get("role") != "assistant":
                raise UserError(f"{where}: the first two messages must have roles 'user' then 'assistant', got "
                                f"{msgs[0].get('role')!r} then {msgs[1].get('role')!r}")
            x, y = msgs[0].get("content"), msgs[1].get("content")
        elif "prompt" in rec and "response" in rec:
            x, y = rec["prompt"], rec["response"]
        else:
            raise UserError(f"{where}: missing field 'messages' (or 'prompt' and 'response')")
        x, y = _text(x, where, "prompt (user turn)"), _text(y, where, "response (assistant turn)")
        out.append({"x": x, "y": y, "system": system, "where": where})
        if max_examples and len(out) >= max_examples:
            break
    if not out:
        raise UserError(f"{path}: no records")
    return out


def _text(v, where, name):
    """A message's content as one string: a string, or a list of text parts ({"type": "text", "text": ...})."""
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in v):
        v = "".join(p["text"] for p in v)
    if not isinstance(v, str):
        raise UserError(f"{where}: {name} must be a string (or a list of text parts), got {type(v).__name__}")
    if not v.strip():
        raise UserError(f"{where}: {name} is empty")
    return v


def load_pref_jsonl(path, max_examples=0):
    """Annotated preference pairs for `--method dpo`: (x, chosen, rejected) with errors naming file:line (JSONL,
    Parquet or a hub data set: read_records).

    A record is UltraFeedback-binarized style, {"prompt": x, "chosen": [messages], "rejected": [messages]}
    (the response is the last assistant message of each list), or {"prompt": x, "chosen": str, "rejected": str}.
    """
    out = []
    for where, rec in read_records(path, "--pref_data (needed by --method dpo)"):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
        if missing:
            raise UserError(f"{where}: a preference record needs the fields 'prompt', 'chosen' and 'rejected'; missing "
                            f"{', '.join(repr(k) for k in missing)}")
        texts = {"prompt": _text(rec["prompt"], where, "'prompt'")}
        for k in ("chosen", "rejected"):
            v = rec[k]
            if isinstance(v, list) and all(isinstance(m, dict) for m in v):  # a conversation: its last assistant turn
                turns = [m.get("content") for m in v if m.get("role") == "assistant"]
                if not turns:
                    raise UserError(f"{where}: '{k}' has no assistant message (a list of messages needs one with "
                                    "role 'assistant': the answer)")
                v = turns[-1]
            texts[k] = _text(v, where, f"'{k}' (a string, or a list of messages ending with the answer)")
        out.append({"x": texts["prompt"], "chosen": texts["chosen"], "rejected": texts["rejected"], "where": where})
        if max_examples and len(out) >= max_examples:
            break
    if not out:
        raise UserError(f"{path}: no records")
    return out


def tokenize_pref(records, tok, cfg, skipped):
    """Policy tokens of (x, chosen, rejected), with the same length checks as tokenize_data."""
    kept = []
    for r in records:
        px = prompt_ids(tok, r["x"])
        pc, pr = response_ids(tok, r["x"], r["chosen"]), response_ids(tok, r["x"], r["rejected"])
        if not too_long(r["where"], length_problems(px, [pc, pr], cfg), cfg, skipped):
            kept.append((px, pc, pr))
    if not kept:
        raise UserError(f"{cfg['pref_data']}: every record is over-length")
    return kept


def tokenize_sft(records, tok, cfg, skipped):
    """Policy tokens (prompt, golden response) of continual SFT's records, with the length checks of D (not the
    guide's: SFT does not read it)."""
    kept = []
    for r in records:
        px, py = prompt_ids(tok, r["x"], r["system"]), response_ids(tok, r["x"], r["y"], r["system"])
        if not too_long(r["where"], length_problems(px, [py], cfg), cfg, skipped):
            kept.append((px, py))
    if not kept:
        raise UserError(f"{cfg['sft_data'] or cfg['data']}: every record is over-length")
    return kept


def length_problems(px, responses, cfg):
    """What is over the limits in a prompt and its responses (policy tokens)."""
    problems = []
    if len(px) > cfg["max_prompt_len"]:
        problems.append(f"prompt has {len(px)} tokens > max_prompt_len={cfg['max_prompt_len']}")
    n = len(px) + max(len(r) for r in responses)
    if n > cfg["max_len"]:
        problems.append(f"prompt + response have {n} tokens > max_len={cfg['max_len']}")
    return problems


def too_long(where, problems, cfg, skipped):
    """--overlength error: raise naming file:line; skip: record it in `skipped` (skipped.jsonl). True if dropped."""
    if not problems:
        return False
    if cfg["overlength"] == "error":
        raise UserError(f"{where}: {'; '.join(problems)} (raise the limits or pass --overlength skip)")
    skipped.append({"where": where, "why": "; ".join(problems)})
    return True


# ----------------------------------------------------------------------------------------------------
# Tokens: the policy's chat template (one prompt format for generation and training), the guide's plain text
# ----------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, x, system=None):
    """The chat-templated prompt, as token ids: THE one function used for generation AND training.

    SPIN's public code generates with one prompt format and trains with another; a policy then learns
    from sequences it never produces. Here both paths call this function, so x's tokens are identical.
    """
    ids = tokenizer(prompt_text(tokenizer, x, system), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids  # exactly one BOS, whether or not the template writes it
    return ids


def prompt_text(tokenizer, x, system=None):
    """x (after the system message, if any) in the policy's chat template, ending where the answer begins."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": x}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def response_ids(tokenizer, x, y, system=None):
    """Golden response tokens as they follow x's prompt in one text, ending with EOS so the policy learns to stop.

    y is tokenized together with its templated prompt and cut at the prompt's length: that is how the SFT data
    was tokenized (whole conversations) and how the policy's samples y' come out. Tokenized alone, a SentencePiece
    tokenizer (Llama, Mistral / zephyr) starts y with a word-start piece ("_Hello") that the policy never emits
    after "<|assistant|>\n" ("Hello"): every golden y would differ from every sampled y' in its first token, a
    difference DPO learns at once and that says nothing about quality. (TRL's DPOTrainer splits the same way.)
    Where the prompt's last token would merge with y's first characters, there is no clean cut, and y is
    tokenized alone: the policy only ever continues the prompt's own tokens.
    """
    text = prompt_text(tokenizer, x, system)
    p = tokenizer(text, add_special_tokens=False)["input_ids"]
    both = tokenizer(text + y, add_special_tokens=False)["input_ids"]
    ids = both[len(p):] if both[:len(p)] == p else tokenizer(y, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def trl_pairs(tokenizer, records, pairs, weights):
    """Line 10's pairs as TRL's DPOTrainer reads them (docs/trl.md): one row per pair, y wins over y'.

    records: the records of D each pair comes from (x, y, system); pairs: the (x, y, y') token ids line 10 trains
    on; weights: their s_i / S (1 for spin). A row holds
      prompt, chosen, rejected  TRL's plain-text ("standard") preference form: x in the policy's chat template
                                (prompt_text), y as written, y' decoded as in samples.jsonl. TRL tokenizes prompt,
                                then prompt + response + EOS: this project's ids wherever y' is the tokenizer's own
                                spelling of its text and ends with EOS (not so for a y' cut at --max_new_tokens).
      weight                    s_i / S, Algorithm 1, line 9
      prompt_ids, chosen_ids, rejected_ids   the ids trained on here, under the names of TRL's tokenized columns
                                (examples/trl_ldalign.py trains on them instead of re-tokenizing the text).
    """
    return [{"prompt": prompt_text(tokenizer, d["x"], d.get("system")), "chosen": d["y"],
             "rejected": tokenizer.decode(yp, skip_special_tokens=True), "weight": float(w),
             "prompt_ids": px, "chosen_ids": py, "rejected_ids": yp}
            for d, (px, py, yp), w in zip(records, pairs, weights, strict=True)]


def tokenize_data(records, tok, gtok, cfg, log, held_out=False):
    """Tokenize D for the policy (chat template) and the guide (plain text); check lengths up front.

    Over-length records raise with file:line (--overlength error) or are dropped and listed
    (--overlength skip), so a 7B run never dies on record 40,000 hours in.
    """
    kept, skipped = [], []
    for r in records:
        px, py = prompt_ids(tok, r["x"], r.get("system")), response_ids(tok, r["x"], r["y"], r.get("system"))
        gx, gy = guide_ids(gtok, r["x"], r["y"])
        if held_out:  # evaluation samples from x and scores the answer: no guide input, no golden length limit
            problems = [f"prompt has {len(px)} tokens > max_prompt_len={cfg['max_prompt_len']}"] \
                if len(px) > cfg["max_prompt_len"] else []
        else:
            problems = length_problems(px, [py], cfg)
        if not held_out and len(gx) + max(len(gy), cfg["max_new_tokens"] + 1) > cfg["guide_max_len"]:
            problems.append(f"guide input would exceed the guide's {cfg['guide_max_len']} positions")
        if not too_long(r["where"], problems, cfg, skipped):
            kept.append(dict(r, prompt_ids=px, response_ids=py, guide_prompt_ids=gx, guide_response_ids=gy))
    if skipped:
        log(f"skipped {len(skipped)} over-length records (listed in skipped.jsonl); kept {len(kept)}")
    if not kept:
        src = records[0]["where"].rsplit(":", 1)[0] if records else cfg["data"]  # --data or --eval_data
        raise UserError(f"{src}: every record is over-length")
    return kept, skipped


def guide_ids(gtok, x, y):
    """The guide reads plain text, x then y (no chat template: GPT-2 has none); y ends with EOS (guide_triples
    removes it again from a sample y' that the length cap cut off before its EOS)."""
    gx = gtok(x + "\n", add_special_tokens=False)["input_ids"]
    gy = gtok(y, add_special_tokens=False)["input_ids"] + [gtok.eos_token_id]
    return gx, gy


def guide_triples(data, tok, gtok, y_prime_ids, guide_max_len):
    """(x, y, y') in the guide's own tokens: y' is decoded from the policy's ids and re-encoded.

    The guide's tokenizer (GPT-2's) can need more tokens for y' than the policy's did, so y' is cut to
    the guide's context (golden y was checked against it up front, in tokenize_data)."""
    out = []
    for d, yp in zip(data, y_prime_ids):
        gyp = guide_ids(gtok, d["x"], tok.decode(yp, skip_special_tokens=True))[1]
        if not yp or yp[-1] != tok.eos_token_id:
            gyp = gyp[:-1]  # cut off at max_new_tokens: no EOS, so the guide sees an unfinished answer as one
        out.append((d["guide_prompt_ids"], d["guide_response_ids"], gyp[:guide_max_len - len(d["guide_prompt_ids"])]))
    return out


# ----------------------------------------------------------------------------------------------------
# The embedded default: tokenizer and tiny models built from configs (no hub downloads).
# ----------------------------------------------------------------------------------------------------
# The template writes the BOS itself, so every tool that applies it (lm-evaluation-harness too: harness.py) reads the
# same prompt tokens as prompt_ids. A system message is a turn of its own, <|system|>: a special token when D has a
# system message (train_toy_tokenizer), plain text when only --eval_data has one.
TOY_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
                "{% elif m['role'] == 'system' %}<|system|>{{ m['content'] }}<|end|>"
                "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# The BPE trainer learns from texts cut into pieces of at most this many characters: its time grows with the
# square of a pre-tokenized word's length (a run of 100,000 identical emoji, one word, took minutes).
TOY_BPE_PIECE = 1000


def train_toy_tokenizer(texts, vocab_size=300, system=False):
    """A real byte-level BPE trained with `tokenizers` on the shipped data, wrapped as an HF tokenizer.

    texts: D's prompts and responses (and system messages); a text longer than TOY_BPE_PIECE characters is
    learnt from in pieces of that length (it is still tokenized whole). system: D has a system message, and
    <|system|> is a special token too, after the others (whose ids are the same either way).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>"] + (["<|system|>"] if system else [])
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    pieces = (t[i:i + TOY_BPE_PIECE] for t in texts for i in range(0, len(t), TOY_BPE_PIECE))
    tk.train_from_iterator(pieces, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>")
    tok.chat_template = TOY_TEMPLATE
    return tok


def tiny_policy_config(tok, max_len):
    """About 0.83M parameters: learns the sorting task only partly after the short SFT (room to improve)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(128, max_len),
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=True)


def tiny_guide_config(gtok, n_positions):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=len(gtok), n_embd=64, n_layer=2, n_head=4, n_positions=n_positions,
                      bos_token_id=gtok.bos_token_id, eos_token_id=gtok.eos_token_id)

