"""Data (dataset.py): bad input names file:line before any compute: JSONL / UTF-8 errors (SFT and preference files),
Parquet and hub data sets (file:row), JSONL as real data looks (BOM, gzip, system message, text parts), over-length
records, one prompt format (the toy template's system turn), golden tokens after the prompt, the shipped data, a
mistyped local path, the toy tokenizer on a long run of one character.
"""
import json
import os

import pytest

import dataset
import dpo
import ldalign
import stages
from run import cli, rundir
from tests.builders import (
    GOOD,
    HERE,
    _toy_tok,
)


# ====================================================================================================
# Data (dataset.py): bad input names file:line, before any compute
# ====================================================================================================
def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def _toy_tok_dir(tmp_path):
    path = str(tmp_path / "toy_tok")
    _toy_tok().save_pretrained(path)
    return path


@pytest.mark.parametrize("bad, msg", [
    ('{"messages": [', "not valid JSON"),
    ('{"text": "no messages"}', "missing field 'messages'"),
    ('[1, 2]', "expected a JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "'messages' must be a list starting with"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}), "roles"),
    (json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]}),
     "prompt .* is empty"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}),
     "response .* is empty"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}),
     "must be a string"),
])
def test_malformed_jsonl_rejected_with_file_and_line(tmp_path, bad, msg):
    path = _write(tmp_path, [GOOD, "", bad, GOOD])
    with pytest.raises(ValueError, match=f"{path}:3: .*{msg}"):
        dataset.load_sft_jsonl(path)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "sort: 1 2", "response": "\xff"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not valid UTF-8"):
        dataset.load_sft_jsonl(str(path))


def test_jsonl_as_real_data_looks(tmp_path):
    """A UTF-8 byte-order mark, gzip, a leading system message (kept, and in the prompt for generation and training
    alike), content as a list of text parts."""
    import gzip
    rec = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "sort: 3 1"}]},
                        {"role": "assistant", "content": "1 3"}]}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(rec).encode() + b"\n")
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write(json.dumps(rec) + "\n")
    for name in ("bom.jsonl", "z.jsonl.gz"):
        [r] = dataset.load_sft_jsonl(str(tmp_path / name))
        assert (r["x"], r["y"], r["system"]) == ("sort: 3 1", "1 3", "Be brief.")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(_toy_tok_dir(tmp_path))
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    px = dataset.prompt_ids(tok, "sort: 3 1", "Be brief.")
    assert "Be brief." in tok.decode(px)
    ids, _, _ = dpo.collate([px], [dataset.response_ids(tok, "sort: 3 1", "1 3", "Be brief.")], 0)
    assert ids[0, :len(px)].tolist() == px  # training reads the same prompt tokens
    (tmp_path / "bad.jsonl").write_text('{"prompt": "abc\n')
    with pytest.raises(ValueError, match="not valid JSON: Invalid control character at column 16$"):  # one "at"
        dataset.load_sft_jsonl(str(tmp_path / "bad.jsonl"))


def test_parquet_and_hub_data_as_downloaded(tmp_path):
    """UltraChat 200k and UltraFeedback binarized as their Parquet files (pyarrow), with the same checks, the errors
    naming file:row; a hub data set name:split without the datasets package says what is missing."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    def turn(role, text):
        return {"content": text, "role": role}
    chat = [{"prompt": f"sort: {i} 1", "prompt_id": str(i), "messages": [turn("user", f"sort: {i} 1"),
             turn("assistant", f"1 {i}"), turn("user", "why?"), turn("assistant", "ascending")]} for i in (3, 5)]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "train_sft.parquet")
    recs = dataset.load_sft_jsonl(str(tmp_path / "train_sft.parquet"))
    assert [(r["x"], r["y"], r["where"]) for r in recs] == [
        ("sort: 3 1", "1 3", f"{tmp_path}/train_sft.parquet:row 1"),
        ("sort: 5 1", "1 5", f"{tmp_path}/train_sft.parquet:row 2")]
    chat[1]["messages"][1]["content"] = " "
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=f"{tmp_path}/bad.parquet:row 2: response .* is empty"):
        dataset.load_sft_jsonl(str(tmp_path / "bad.parquet"))
    prefs = [{"prompt": "sort: 3 1", "prompt_id": "3", "chosen": [turn("user", "sort: 3 1"), turn("assistant", "1 3")],
              "rejected": [turn("user", "sort: 3 1"), turn("assistant", "3 1")], "score_chosen": 9.0,
              "score_rejected": 2.0}]
    pq.write_table(pa.Table.from_pylist(prefs), tmp_path / "train_prefs.parquet")
    [p] = dataset.load_pref_jsonl(str(tmp_path / "train_prefs.parquet"))
    assert (p["x"], p["chosen"], p["rejected"]) == ("sort: 3 1", "1 3", "3 1")
    import importlib.util
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ValueError, match="--data HuggingFaceH4/ultrachat_200k:train_sft: a hub data set .* needs "
                                             "the datasets package"):
            dataset.load_sft_jsonl("HuggingFaceH4/ultrachat_200k:train_sft")


def test_a_mistyped_local_path_with_a_colon_is_no_such_file():
    """data/sort_trian.jsonl:train reads like a hub data set name:split, but its name is a local file's: the error
    says that no such file exists (not that the datasets package is needed)."""
    with pytest.raises(cli.UserError, match="^data/sort_trian.jsonl:train: no such --data file \\(data/sort_trian"
                                            ".jsonl does not exist either; a hub data set is given as name:split"):
        dataset.load_sft_jsonl("data/sort_trian.jsonl:train")
    for name in ("data/x", "./x", "runs/a/b", "x.json", "x.jsonl.gz", "x.parquet"):
        assert dataset._looks_local(name), name
    for name in ("HuggingFaceH4/ultrachat_200k", "trl-lib/ultrafeedback_binarized", "imdb"):
        assert not dataset._looks_local(name), name


def test_toy_template_renders_a_system_turn(tmp_path):
    """A system message is a turn of its own (<|system|>), not an assistant turn: a special token of the toy
    tokenizer when D has a system message, after the other special tokens (whose ids stay the same)."""
    plain = _toy_tok()
    recs = dataset.load_sft_jsonl(os.path.join(HERE, "data", "sort_train.jsonl"), 300)
    tok = dataset.train_toy_tokenizer([t for r in recs for t in (r["x"], r["y"])] + ["Be brief."], system=True)
    assert dataset.prompt_text(tok, "sort: 3 1", "Be brief.") == \
        "<|bos|><|system|>Be brief.<|end|><|user|>sort: 3 1<|end|><|assistant|>"
    sys_id = tok.convert_tokens_to_ids("<|system|>")
    assert dataset.prompt_ids(tok, "sort: 3 1", "Be brief.")[:2] == [tok.bos_token_id, sys_id]
    assert sys_id == 5 and tok.decode([sys_id], skip_special_tokens=True) == ""
    assert [tok.convert_tokens_to_ids(t) for t in ("<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>")] \
        == [plain.convert_tokens_to_ids(t) for t in ("<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>")]
    assert "<|system|>" not in plain.get_vocab()  # the shipped data has no system message: its tokenizer as before
    # dataset.load trains the toy tokenizer with <|system|> when a record of D has a system message
    path = tmp_path / "d.jsonl"
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sort: 3 1"},
                        {"role": "assistant", "content": "1 3"}]}
    path.write_text(json.dumps(rec) + "\n" + GOOD + "\n")
    run = rundir.RunDir(dict(ldalign.DEFAULTS, out=str(tmp_path / "run")), stages.METHODS)
    cfg = dict(run.cfg, data=str(path), eval_data="", max_examples=0)
    data = dataset.load(cfg, run)
    sys_id = data.tok.convert_tokens_to_ids("<|system|>")
    assert data.D[0]["prompt_ids"][:2] == [data.tok.bos_token_id, sys_id] and sys_id not in data.D[1]["prompt_ids"]


def test_toy_tokenizer_trains_fast_on_a_long_run_of_one_character():
    """A record that is one run of 100,000 identical emoji (400 KB) is one pre-tokenized word, and the BPE trainer's
    time grows with the square of a word's length (minutes for this one): the toy tokenizer learns from
    pieces of at most dataset.TOY_BPE_PIECE characters, and still tokenizes the record whole."""
    import time
    long = "\U0001F600" * 100_000
    start = time.time()
    tok = dataset.train_toy_tokenizer(["sort: 3 1", "1 3", long])
    assert time.time() - start < 20
    assert tok.decode(tok(long, add_special_tokens=False)["input_ids"]) == long


def test_jsonl_reads_first_turn_and_prompt_response_form(tmp_path):
    multi = json.dumps({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]})
    path = _write(tmp_path, [multi, json.dumps({"prompt": "p", "response": "r"})])
    recs = dataset.load_sft_jsonl(path)
    assert [(r["x"], r["y"], r["where"]) for r in recs] == [("q1", "a1", f"{path}:1"), ("p", "r", f"{path}:2")]


def test_pref_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    p.write_text(good + "\n" + json.dumps({"prompt": "q", "chosen": [{"role": "user", "content": "q"}],
                                          "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=f"{p}:2: 'chosen' has no assistant message"):
        dataset.load_pref_jsonl(str(p))
    p.write_text(good + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=f"{p}:2: a preference record needs .*; missing 'rejected'$"):
        dataset.load_pref_jsonl(str(p))
    p.write_text(good + "\n" + json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=f"{p}:2: 'chosen' \\(a string, or a list of messages .*\\) must be a string"):
        dataset.load_pref_jsonl(str(p))
    recs = dataset.load_pref_jsonl(os.path.join(HERE, "data", "sort_pairs.jsonl"))
    assert len(recs) == 2000 and all(r["chosen"] != r["rejected"] for r in recs)
    # over-length pairs: an error naming file:line, or (skip) listed like the SFT records
    long = " ".join(str(i) for i in range(40))
    p.write_text(good + "\n" + json.dumps({"prompt": "q", "chosen": "a", "rejected": long}) + "\n")
    cfg = dict(max_prompt_len=32, max_len=64, overlength="error", pref_data=str(p))
    with pytest.raises(ValueError, match=f"{p}:2: prompt \\+ response have .* > max_len=64"):
        dataset.tokenize_pref(dataset.load_pref_jsonl(str(p)), _toy_tok(), cfg, [])
    skipped = []
    kept = dataset.tokenize_pref(dataset.load_pref_jsonl(str(p)), _toy_tok(), dict(cfg, overlength="skip"), skipped)
    assert len(kept) == 1 and skipped[0]["where"] == f"{p}:2"


def test_overlength_rejected_with_file_and_line_or_skipped(tmp_path):
    tok = _toy_tok()
    long_y = " ".join(str(i) for i in range(40))
    path = _write(tmp_path, [GOOD, json.dumps({"prompt": "sort: 1 2", "response": long_y})])
    cfg = dict(max_prompt_len=32, max_len=64, max_new_tokens=16, guide_max_len=128, overlength="error", data=path)
    with pytest.raises(ValueError, match=f"{path}:2: prompt \\+ response have .* > max_len=64"):
        dataset.tokenize_data(dataset.load_sft_jsonl(path), tok, tok, cfg, print)
    kept, skipped = dataset.tokenize_data(dataset.load_sft_jsonl(path), tok, tok, dict(cfg, overlength="skip"), print)
    assert len(kept) == 1 and skipped[0]["where"] == f"{path}:2"


def test_one_prompt_format_for_generation_and_training():
    tok = _toy_tok()
    px = dataset.prompt_ids(tok, "sort: 3 1 2")
    assert px[0] == tok.bos_token_id and px.count(tok.bos_token_id) == 1
    assert tok.decode(px) == "<|bos|><|user|>sort: 3 1 2<|end|><|assistant|>"
    # the DPO batch is built from exactly these ids
    ids, _, labels = dpo.collate([px], [dataset.response_ids(tok, "sort: 3 1 2", "1 2 3")], 0)
    assert ids[0, :len(px)].tolist() == px and (labels[0, :len(px)] == dpo.IGNORE).all()
    assert ids[0, -1].item() == tok.eos_token_id


def test_golden_response_tokens_are_those_that_follow_the_prompt():
    """A SentencePiece-style tokenizer (Metaspace, word-start piece only at the start of a text, as Llama /
    Mistral): y alone starts with "_Hello", y after the prompt with "Hello", which is what the policy samples.
    response_ids must give the latter, or golden y and sampled y' differ in their first token, always."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<unk>", "<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>"]
    tk.train_from_iterator(["Hello world, hello there"] * 10, trainers.BpeTrainer(
        vocab_size=60, special_tokens=specials, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
                                  unk_token="<unk>")
    tok.chat_template = dataset.TOY_TEMPLATE
    x, y = "Hello there", "Hello world"
    py = dataset.response_ids(tok, x, y)
    joint = tok(dataset.prompt_text(tok, x) + y, add_special_tokens=False)["input_ids"]
    assert joint[-len(py) + 1:] == py[:-1] and py[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(py[0]) == "Hello"
    alone = tok(y, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone[0]) == "\u2581Hello"  # the check above is not vacuous
    assert dataset.prompt_ids(tok, x) == joint[:-len(py) + 1]  # prompt + response = the one joint text (the template
    # writes the BOS)


def test_shipped_data_is_reproducible_and_disjoint(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_sort", os.path.join(HERE, "data", "make_sort.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import random
    rng, seen = random.Random(0), set()
    ev, tr = mod.make_records(200, rng, seen), mod.make_records(8000, rng, seen)
    assert ev == [json.loads(line) for line in open(os.path.join(HERE, "data", "sort_eval.jsonl"))]
    assert tr == [json.loads(line) for line in open(os.path.join(HERE, "data", "sort_train.jsonl"))]
    assert not {r["prompt"] for r in ev} & {r["prompt"] for r in tr}
