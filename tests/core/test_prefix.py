"""The shared-prefix reader against the full-sequence ActivationReader on tiny random models."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from austeer_pl import ActivationReader, accumulate_momentum, locate_units
from austeer_pl.core import kvcache
from austeer_pl.core.kvcache import prefix_last_logits
from austeer_pl.core.pairs import pair_batch, read_pair_batch, rows_batch, split_batch
from austeer_pl.core.prefix import SharedPrefixReader, split_shared_prefix
from austeer_pl.core.tokens import encode_texts
from austeer_pl.errors import AusteerError
from austeer_pl.scoring.evaluate import answer_suffixes
from austeer_pl.scoring.loglik import choice_logprobs
from austeer_pl.tasks import Task, TaskExample
from austeer_pl.tasks.prompts import format_prompt, prompt_prefix

from helpers import (
    CORE_ARCHS,
    make_model,
    make_tokenizer,
    random_state,
    tiny_model,
    tiny_tokenizer,
    word_examples,
)

SITES = ["attention", "ffn", "residual"]


def random_ids(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 60, (n,), generator=g).tolist() for n in lengths]


# Prompts from 1 to 19 tokens (longer than gemma2's sliding window of 8), answers from 1 to 5.
PROMPT_LENS = [3, 12, 1, 19, 7, 9]
POS_LENS = [1, 4, 2, 1, 3, 5]
NEG_LENS = [2, 1, 1, 5, 3, 1]


def full_reads(model, layout, sites, seqs):
    """Oracle: ActivationReader on every full sequence, each read alone (no padding).

    (Batched right padding is not used here: in float64 eager attention a pad query whose sliding
    window holds no real key gives NaN, which the matmul with zero weights spreads to real rows.)
    """
    reader = ActivationReader(model, layout, sites)
    rows = []
    with torch.inference_mode():
        for s in seqs:
            ids = torch.tensor([s])
            rows.append(reader(ids, torch.ones_like(ids)))
    return {site: torch.cat([r[site] for r in rows]) for site in sites}


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_full_sequence_reader_mixed_lengths(arch, dtype):
    model = make_model(arch).to(dtype)
    layout = locate_units(model)
    prompts, pos, neg = random_ids(PROMPT_LENS, 1), random_ids(POS_LENS, 2), random_ids(NEG_LENS, 3)
    got_pos, got_neg = read_pair_batch(model, layout, pair_batch(prompts, pos, neg, pad_id=0), SITES)
    want_pos = full_reads(model, layout, SITES, [p + a for p, a in zip(prompts, pos)])
    want_neg = full_reads(model, layout, SITES, [p + a for p, a in zip(prompts, neg)])
    atol = 1e-5 if dtype == torch.float32 else 2e-6  # gemma2 runs its softmax in float32 even in float64
    for site in SITES:
        assert got_pos[site].shape == (len(prompts), layout.n_layers, layout.site(site).size)
        assert got_pos[site].dtype == torch.float32
        assert torch.isfinite(got_pos[site]).all() and torch.isfinite(got_neg[site]).all()
        assert torch.allclose(got_pos[site], want_pos[site], atol=atol), (
            site,
            (got_pos[site] - want_pos[site]).abs().max(),
        )
        assert torch.allclose(got_neg[site], want_neg[site], atol=atol), (
            site,
            (got_neg[site] - want_neg[site]).abs().max(),
        )
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_pad_id_and_batch_composition_do_not_matter():
    model = make_model("llama")
    layout = locate_units(model)
    prompts, pos, neg = random_ids(PROMPT_LENS, 4), random_ids(POS_LENS, 5), random_ids(NEG_LENS, 6)
    a_pos, a_neg = read_pair_batch(model, layout, pair_batch(prompts, pos, neg, pad_id=0), ["attention"])
    b_pos, _b_neg = read_pair_batch(model, layout, pair_batch(prompts, pos, neg, pad_id=17), ["attention"])
    assert torch.allclose(a_pos["attention"], b_pos["attention"], atol=1e-6)
    for i in range(len(prompts)):  # each pair read alone equals its row in the batch
        s_pos, s_neg = read_pair_batch(
            model, layout, pair_batch(prompts[i : i + 1], pos[i : i + 1], neg[i : i + 1]), ["attention"]
        )
        assert torch.allclose(s_pos["attention"][0], a_pos["attention"][i], atol=1e-5)
        assert torch.allclose(s_neg["attention"][0], a_neg["attention"][i], atol=1e-5)


def test_shared_prompts_and_answers_are_computed_once():
    """Pairs from negatives='all' share prompt and right answer; duplicates are read once, values unchanged."""
    model = make_model("gemma2").double()
    layout = locate_units(model)
    p1, p2 = random_ids([11, 4], 7)
    prompts = [p1, p1, p1, p2, p2]
    pos = [[5], [5], [5], [9, 9], [9, 9]]
    neg = [[6], [7, 8], [10], [11], [12, 13, 14]]
    reader = SharedPrefixReader(model, layout, ["ffn"])
    calls = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            got_pos, got_neg = reader.read_pairs(prompts, pos, neg)
    finally:
        handle.remove()
    # 2 distinct prompts prefilled once; 7 distinct continuations in 4 rounds over the 2 cache rows
    # (p1 has 4 distinct answers, p2 has 3: the last round runs a dropped pad token for p2).
    assert calls == [
        torch.Size([2, 11]),
        torch.Size([2, 2]),
        torch.Size([2, 1]),
        torch.Size([2, 3]),
        torch.Size([2, 1]),
    ]
    want_pos = full_reads(model, layout, ["ffn"], [p + a for p, a in zip(prompts, pos)])
    want_neg = full_reads(model, layout, ["ffn"], [p + a for p, a in zip(prompts, neg)])
    assert torch.allclose(got_pos["ffn"], want_pos["ffn"], atol=2e-6)
    assert torch.allclose(got_neg["ffn"], want_neg["ffn"], atol=2e-6)
    assert torch.equal(got_pos["ffn"][0], got_pos["ffn"][2])


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_momentum_counts_identical_to_unshared_pass(arch):
    model = make_model(arch).double()  # float64: values agree to ~1e-15 (gemma2 ~1e-7), so signs agree
    tok = make_tokenizer()
    layout = locate_units(model)
    g = torch.Generator().manual_seed(11)
    # Four-letter words and a one-character optional suffix: the texts of a batch differ by at most
    # 6 characters, fewer than gemma2's sliding window (8), so the unshared oracle's right padding
    # stays NaN-free in float64 (a pad query must see a real key within its window).
    words = ["good", "fine", "nice", "dull", "poor", "okay", "cool", "vile"]
    pairs = []
    for i in range(14):
        idx = torch.randint(len(words), (4,), generator=g).tolist()
        prompt = f"review {i % 10}: " + " ".join(words[j] for j in idx[: 1 + i % 2]) + "? answer:"
        pairs.append((f"{prompt} {words[idx[2]]}", f"{prompt} {words[idx[3]]}{'' if i % 3 else '!'}"))
    sites = ["attention", "ffn"]
    plain = accumulate_momentum(model, tok, pairs, sites=sites, batch_size=4, layout=layout, shared_prefix=False)
    shared = accumulate_momentum(model, tok, pairs, sites=sites, batch_size=4, layout=layout, shared_prefix=True)
    assert shared.n == plain.n == len(pairs)
    for key, value in plain.tensors.items():
        if value.dtype == torch.int64:
            assert torch.equal(value, shared.tensors[key]), key
        else:
            assert torch.allclose(value, shared.tensors[key], rtol=1e-5, atol=1e-5), key


@pytest.mark.parametrize("side", ["right", "left"])
def test_read_pair_batch_drop_in(side):
    model = make_model("gpt2")
    tok = make_tokenizer(padding_side=side)
    layout = locate_units(model)
    pos_texts = ["is it good? yes", "bad film. no", "a truly wonderful, moving story! great", "x"]
    neg_texts = ["is it good? no", "bad film. yes indeed", "a truly wonderful, moving story! dull", "y"]
    pos, neg = encode_texts(tok, pos_texts), encode_texts(tok, neg_texts)
    with torch.inference_mode():
        want = read_pair_batch(
            model,
            layout,
            rows_batch(encode_texts(make_tokenizer(), pos_texts), encode_texts(make_tokenizer(), neg_texts)),
            ["attention", "ffn"],
        )
    got = read_pair_batch(model, layout, split_batch(pos, neg, pad_id=tok.pad_token_id), ["attention", "ffn"])
    for w, g in zip(want, got):
        for site in w:
            assert torch.allclose(w[site], g[site], atol=1e-5), site


def test_split_shared_prefix():
    assert split_shared_prefix([[5, 6, 7]], [[5, 6, 8, 9]]) == ([[5, 6]], [[7]], [[8, 9]])
    # One sequence a prefix of the other, or both equal: every rest keeps its read token.
    assert split_shared_prefix([[5, 6]], [[5, 6, 7]]) == ([[5]], [[6]], [[6, 7]])
    assert split_shared_prefix([[5, 6]], [[5, 6]]) == ([[5]], [[6]], [[6]])
    assert split_shared_prefix([[4]], [[5]]) == ([[]], [[4]], [[5]])
    with pytest.raises(AusteerError, match="empty"):
        split_shared_prefix([[]], [[1]])


def test_empty_prompt_empty_answer_and_truncation():
    model = make_model("gemma2").double()
    layout = locate_units(model)
    prompts = [[], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21]]
    pos = [[30, 31], [], [22] * 12]  # an empty answer reads the prompt's last token
    neg = [[32], [40], [23]]
    got_pos, got_neg = read_pair_batch(model, layout, pair_batch(prompts, pos, neg), ["attention"])
    want_pos = full_reads(model, layout, ["attention"], [p + a for p, a in zip(prompts, pos)])
    want_neg = full_reads(model, layout, ["attention"], [p + a for p, a in zip(prompts, neg)])
    assert torch.allclose(got_pos["attention"], want_pos["attention"], atol=2e-6)
    assert torch.allclose(got_neg["attention"], want_neg["attention"], atol=2e-6)
    # max_length keeps the last tokens of each full sequence, as the Lightning collate does.
    got_pos, got_neg = read_pair_batch(model, layout, pair_batch(prompts, pos, neg, max_length=5), ["attention"])
    want_pos = full_reads(model, layout, ["attention"], [(p + a)[-5:] for p, a in zip(prompts, pos)])
    want_neg = full_reads(model, layout, ["attention"], [(p + a)[-5:] for p, a in zip(prompts, neg)])
    assert torch.allclose(got_pos["attention"], want_pos["attention"], atol=2e-6)
    assert torch.allclose(got_neg["attention"], want_neg["attention"], atol=2e-6)
    with pytest.raises(AusteerError, match="empty"):
        read_pair_batch(model, layout, pair_batch([[]], [[]], [[1]]), ["attention"])


def test_fallback_without_cache_gives_same_values():
    model = make_model("llama")
    layout = locate_units(model)
    prompts, pos, neg = random_ids(PROMPT_LENS, 8), random_ids(POS_LENS, 9), random_ids(NEG_LENS, 10)
    reader = SharedPrefixReader(model, layout, ["ffn"])
    reader.fallback_reason = "forced"
    with torch.inference_mode():
        fb_pos, fb_neg = reader.read_pairs(prompts, pos, neg)
    sh_pos, sh_neg = read_pair_batch(model, layout, pair_batch(prompts, pos, neg), ["ffn"])
    assert torch.allclose(fb_pos["ffn"], sh_pos["ffn"], atol=1e-5)
    assert torch.allclose(fb_neg["ffn"], sh_neg["ffn"], atol=1e-5)


# ---------------------------------------------------------------------------- performance edits elsewhere
# (Kept here with the other benchmark-driven code: the dense-multiply steering path and the
# index_select capture of ActivationReader must give the same bits as the paths they speed up.)
def test_steering_dense_path_is_bit_identical(monkeypatch):
    from austeer_pl import SteeringState, select_units
    from austeer_pl.core import hooks

    model = make_model("llama")
    tok = make_tokenizer(padding_side="left")
    layout = locate_units(model)
    pairs = [("is it good? yes", "is it good? no"), ("bad film. no", "bad film. yes"), ("what a mess", "what a joy")]
    acc = accumulate_momentum(model, tok, pairs, sites=["attention", "ffn"], layout=layout)
    state = SteeringState.from_selection(select_units(acc, 12, ["attention", "ffn"], "both"), layout, alpha=20.0)
    batch = tok(["is it good? ", "a truly wonderful, moving story! so "], return_tensors="pt", padding=True)

    def run():
        with state.apply(model, layout=layout), torch.no_grad():
            logits = model(**batch).logits
            out = model.generate(
                **batch,
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
        return logits, out.sequences, torch.stack(out.scores)

    monkeypatch.setattr(hooks, "_DENSE_MAX_NUMEL", {"cpu": 1 << 30})
    dense = run()
    monkeypatch.setattr(hooks, "_DENSE_MAX_NUMEL", {"cpu": 0})
    indexed = run()
    for a, b in zip(dense, indexed):
        assert torch.equal(a, b)
    with torch.no_grad():
        plain = model(**batch).logits
    assert not torch.equal(dense[0], plain)


def test_reader_fast_capture_equals_fancy_indexing():
    model = make_model("gemma2")
    layout = locate_units(model)
    tok = make_tokenizer()
    batch = tok(["is it good? yes", "bad", "a truly wonderful, moving story!"], return_tensors="pt", padding=True)
    reader = ActivationReader(model, layout, SITES)
    with torch.inference_mode():
        got = reader(batch["input_ids"], batch["attention_mask"])
    last = batch["attention_mask"].sum(1) - 1
    for site in SITES:
        for layer in range(layout.n_layers):
            box = {}
            module = layout.site(site).modules[layer]
            if layout.site(site).reads_input:
                h = module.register_forward_pre_hook(lambda m, a: box.setdefault("x", a[0].clone()))
            else:
                h = module.register_forward_hook(
                    lambda m, a, o: box.setdefault("x", (o if torch.is_tensor(o) else o[0]).clone())
                )
            with torch.no_grad():
                model(**batch)
            h.remove()
            want = box["x"][torch.arange(3), last]
            assert torch.equal(got[site][:, layer], want), (site, layer)
    assert got["attention"].is_contiguous() and got["attention"].shape == (
        3,
        layout.n_layers,
        layout.site("attention").size,
    )


def test_unsupported_cache_falls_back_once_per_class(monkeypatch):
    import transformers
    from transformers.cache_utils import DynamicLayer

    from austeer_pl.core import prefix

    class OtherLayer(DynamicLayer):
        pass

    class OtherCache(transformers.DynamicCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.layer_class_to_replicate = OtherLayer

    monkeypatch.setattr(kvcache, "UNSUPPORTED", {})
    monkeypatch.setattr(prefix, "DynamicCache", OtherCache)
    model = make_model("llama")
    layout = locate_units(model)
    prompts, pos, neg = random_ids(PROMPT_LENS, 12), random_ids(POS_LENS, 13), random_ids(NEG_LENS, 14)
    with pytest.warns(UserWarning, match="not available"):
        got_pos, _ = read_pair_batch(model, layout, pair_batch(prompts, pos, neg), ["ffn"])
    assert type(model) in kvcache.UNSUPPORTED
    want = full_reads(model, layout, ["ffn"], [p + a for p, a in zip(prompts, pos)])
    assert torch.allclose(got_pos["ffn"], want["ffn"], atol=1e-5)
    calls = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs.get("cache")), with_kwargs=True
    )
    try:
        read_pair_batch(model, layout, pair_batch(prompts, pos, neg), ["ffn"])  # no second attempt
    finally:
        handle.remove()
    assert calls == [None]


# ---------------------------------------------------------------------------- scoring after a shared prefix
def whole_last_logits(model, seqs):
    """Oracle: each full sequence alone, no cache, its last position's logits."""
    with torch.inference_mode():
        return torch.cat([model(input_ids=torch.tensor([s])).logits[:, -1] for s in seqs])


@pytest.mark.parametrize(
    ("arch", "scope"),
    [("llama", None), ("llama", "all"), ("llama", "prompt"), ("llama", "generated"), ("gpt2", "all"), ("qwen3", None)],
)
def test_prefix_last_logits_equal_whole_prompts(arch, scope):
    model = make_model(arch).to(torch.float64)
    layout = locate_units(model)
    prefix, rests = random_ids([9], 4)[0], random_ids([3, 1, 6, 2], 5)
    seqs = [prefix + r for r in rests]
    unsteered = whole_last_logits(model, seqs)
    state = None if scope is None else random_state(layout, ["attention", "ffn"], token_scope=scope)
    with state.apply(model) if state is not None else contextlib.nullcontext(), torch.inference_mode():
        got = prefix_last_logits(model, prefix, rests, pad_id=0)
        want = whole_last_logits(model, seqs)  # under the same hooks: a plain forward is the prompt
    assert got is not None and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # eager attention: softmax in float32
    # The continued rest is the prompt: steered under "all" and "prompt", not under "generated".
    assert torch.allclose(got, unsteered) == (scope in (None, "generated"))


def test_prefix_last_logits_decline_what_they_cannot_do_exactly():
    model = make_model("gemma2")  # a sliding window of 8 tokens: left pads between prefix and rest would count
    assert prefix_last_logits(model, random_ids([6], 1)[0], random_ids([3, 1], 2), pad_id=0) is None
    assert prefix_last_logits(make_model("llama"), [], [[3, 4]], pad_id=0) is None


def test_demonstration_prompts_are_scored_from_their_shared_prefix(monkeypatch):
    import austeer_pl.scoring.loglik as loglik

    model, tok = tiny_model().to(torch.float64), tiny_tokenizer()
    tok.pad_token = "<unk>"
    examples = word_examples(torch.randint(1, 12, (10,), generator=torch.Generator().manual_seed(0)).tolist(), seed=0)
    task = Task(
        "words",
        tuple(examples),
        demonstrations=(("w11 w12 w13", "w5"), ("w14 w15", "w6")),
        instruction="w40 w41\n",
        answer_prefix="w3",
    )
    prompts = [format_prompt(tok, task, ex.prompt, chat_template=False) for ex in examples]
    prefix = prompt_prefix(tok, task, prompts)
    assert prefix == "w40 w41\nw11 w12 w13\nw3 w5\n\nw14 w15\nw3 w6\n\n"
    # Without demonstrations the prefix is the instruction; with neither (and no chat template) there is none.
    bare = dataclasses.replace(task, demonstrations=())
    bare_prompts = [format_prompt(tok, bare, ex.prompt, chat_template=False) for ex in examples]
    assert prompt_prefix(tok, bare, bare_prompts) == "w40 w41\n"
    plain = dataclasses.replace(bare, instruction="")
    assert (
        prompt_prefix(tok, plain, [format_prompt(tok, plain, ex.prompt, chat_template=False) for ex in examples])
        is None
    )
    answers = [answer_suffixes(p, ex.choices, task) for p, ex in zip(prompts, examples)]
    continued = []
    spy = loglik.prefix_last_logits
    monkeypatch.setattr(loglik, "prefix_last_logits", lambda *a, **k: continued.append(len(a[2])) or spy(*a, **k))
    with torch.inference_mode():
        whole = choice_logprobs(model, tok, prompts, answers, batch_size=4)
        shared = choice_logprobs(model, tok, prompts, answers, batch_size=4, prefix=prefix)
        cut = choice_logprobs(model, tok, prompts, answers, batch_size=4, prefix=prefix, max_length=16)
    lengths = [len(ids) for ids in tok(prompts)["input_ids"]]
    short = [sum(n <= 16 for n in lengths[i : i + 4]) for i in range(0, 10, 4)]
    # Every row continued the prefix; with max_length=16 only the rows that are not truncated do.
    assert continued == [4, 4, 2] + [n for n in short if n]
    assert 0 < sum(short) < 10
    torch.testing.assert_close(torch.stack(shared), torch.stack(whole), rtol=0, atol=1e-10)
    with torch.inference_mode():
        cut_whole = choice_logprobs(model, tok, prompts, answers, batch_size=4, max_length=16)
    torch.testing.assert_close(torch.stack(cut), torch.stack(cut_whole), rtol=0, atol=1e-10)
    # A chat template's head (before the user's turn) is a prefix too, with or without an instruction.
    tok.chat_template = "{% for m in messages %}w1 w2 {{ m['content'] }}\n{% endfor %}w3"
    chat = [format_prompt(tok, plain, ex.prompt) for ex in examples]
    assert prompt_prefix(tok, plain, chat) == "w1 w2 "
    answers = [answer_suffixes(p, ex.choices, plain) for p, ex in zip(chat, examples)]
    continued.clear()
    with torch.inference_mode():
        whole = choice_logprobs(model, tok, chat, answers, batch_size=4)
        shared = choice_logprobs(model, tok, chat, answers, batch_size=4, prefix="w1 w2 ")
    assert continued == [4, 4, 2]
    torch.testing.assert_close(torch.stack(shared), torch.stack(whole), rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ["gpt2"])
def test_multi_token_answers_are_scored_from_the_shared_prefix(arch, monkeypatch):
    """Character-level answers (" yes", " no": several tokens each) continue the demonstrations' cache too:
    each batch's prompts are prefilled after it once, and every answer continues its prompt; with the
    sharing off (the accelerator default) every ``prompt + answer`` is scored whole, to the same values."""
    import austeer_pl.scoring.loglik as loglik

    model, tok = make_model(arch), make_tokenizer()  # float32: a left-padded float64 eager row can be all masked
    examples = [
        TaskExample(f"is {i % 7} less than {(i * 3) % 5}", ("yes", "no, not"), int((i % 7) >= (i * 3) % 5), f"t:{i}")
        for i in range(9)
    ]
    task = Task("less", tuple(examples), demonstrations=(("is 1 less than 2", "yes"), ("is 5 less than 3", "no, not")))
    prompts = [format_prompt(tok, task, ex.prompt, chat_template=False) for ex in examples]
    answers = [answer_suffixes(p, ex.choices, task) for p, ex in zip(prompts, examples)]
    prefix = prompt_prefix(tok, task, prompts)
    prefixes = []
    spy = loglik.shared_prompt_logprobs
    monkeypatch.setattr(loglik, "shared_prompt_logprobs", lambda *a, **k: prefixes.append(k["prefix"]) or spy(*a, **k))
    with torch.inference_mode():
        shared = choice_logprobs(model, tok, prompts, answers, batch_size=4, prefix=prefix)
        whole = choice_logprobs(model, tok, prompts, answers, batch_size=4, shared_prefix=False)
    prefix_ids = tok(prefix)["input_ids"]
    assert len(prefixes) == 3 and all(p == prefix_ids for p in prefixes)  # 9 prompts in batches of 4
    torch.testing.assert_close(torch.cat(shared), torch.cat(whole), rtol=0, atol=1e-5)


def whole_answer_logprobs(model, prompt, answer):
    """Oracle: ``prompt + answer`` run alone (no padding, no cache), log-probabilities of the answer's tokens summed."""
    ids = torch.tensor([list(prompt) + list(answer)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return float(sum(logp[len(prompt) - 1 + t, a] for t, a in enumerate(answer)))


@pytest.mark.parametrize(
    ("arch", "scope", "with_prefix"),
    [
        ("llama", None, False),
        ("llama", None, True),
        ("llama", "all", False),
        ("llama", "prompt", True),
        ("llama", "generated", False),
        ("gpt2", "all", True),
        ("qwen3", None, False),
    ],
)
def test_shared_prompt_logprobs_equal_each_answer_scored_whole(arch, scope, with_prefix):
    """Each prompt computed once for its answers (after a shared prefix's cache or not) gives every
    answer's log-likelihood as the whole sequence does, steered the same way (float32: in float64 eager
    attention a left pad's query sees no key and its NaN reaches the masked values, as in any left-padded batch)."""
    model = make_model(arch)
    layout = locate_units(model)
    prefix = random_ids([5], 7)[0] if with_prefix else []
    prompts = [prefix + r for r in random_ids([3, 1, 9, 4], 8)]
    answers = [random_ids(lens, 9 + i) for i, lens in enumerate([[2, 5], [1], [4, 1, 3], [6, 2]])]
    state = None if scope is None else random_state(layout, ["attention", "ffn"], token_scope=scope)
    with torch.inference_mode():
        unsteered = kvcache.shared_prompt_logprobs(model, prompts, answers, pad_id=0, prefix=prefix or None)
        with state.apply(model) if state is not None else contextlib.nullcontext():
            got = kvcache.shared_prompt_logprobs(model, prompts, answers, pad_id=0, prefix=prefix or None)
            want = [whole_answer_logprobs(model, p, a) for p, group in zip(prompts, answers) for a in group]
    assert got is not None and unsteered is not None and [len(g) for g in got] == [2, 1, 3, 2]
    want = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(torch.cat(got).double(), want, rtol=0, atol=1e-4)
    # Answers continue the prompt: steered under "all" and "prompt", not under "generated".
    assert torch.allclose(torch.cat(got), torch.cat(unsteered)) == (scope in (None, "generated"))


def test_shared_prompts_decline_what_they_cannot_do_exactly():
    model = make_model("gemma2")  # a sliding window of 8: the prompts' left pads would count
    assert kvcache.shared_prompt_logprobs(model, random_ids([9, 2], 1), [[[3]], [[4, 5]]], pad_id=0) is None
    llama = make_model("llama")
    assert kvcache.shared_prompt_logprobs(llama, random_ids([3], 1), [[[], [4]]], pad_id=0) is None  # an empty answer


def test_choice_logprobs_share_prompts_only_when_nothing_is_truncated(monkeypatch):
    """Multi-token choices: each batch of prompts is computed once for all its answers on the CPU; with
    truncation (max_length) every row is scored whole, with the same values either way."""
    import austeer_pl.scoring.loglik as loglik

    model, tok = make_model("gpt2"), make_tokenizer()  # character-level: every answer is several tokens
    prompts = [f"is {i} less than {(i * 3) % 5}?" for i in range(7)]
    answers = [["yes", "no, not"] if i % 3 else ["yes", "no", "maybe not"] for i in range(7)]
    calls = []
    spy = loglik.shared_prompt_logprobs
    monkeypatch.setattr(loglik, "shared_prompt_logprobs", lambda *a, **k: calls.append(len(a[1])) or spy(*a, **k))
    with torch.inference_mode():
        shared = choice_logprobs(model, tok, prompts, answers, batch_size=3)
        assert calls == [3, 3, 1]
        cut = choice_logprobs(model, tok, prompts, answers, batch_size=3, max_length=12)
        assert calls == [3, 3, 1]  # truncated rows: whole
        monkeypatch.setattr(loglik, "shared_prompt_logprobs", lambda *a, **k: None)  # a model that cannot share
        whole = choice_logprobs(model, tok, prompts, answers, batch_size=3)
    torch.testing.assert_close(torch.cat(shared), torch.cat(whole), rtol=0, atol=1e-5)
    oracle = [
        whole_answer_logprobs(model, tok(p)["input_ids"], tok(p + a)["input_ids"][len(tok(p)["input_ids"]) :])
        for p, group in zip(prompts, answers)
        for a in group
    ]
    torch.testing.assert_close(torch.cat(whole).double(), torch.tensor(oracle, dtype=torch.float64), rtol=0, atol=1e-4)
    assert all(len(c) == len(g) for c, g in zip(cut, answers))
