"""The one batching module: answers tokenized as part of the joined text, left truncation, padding."""

from __future__ import annotations

import torch
import transformers

from austeer_pl.core.tokens import (
    encode_answers,
    encode_pairs,
    encode_texts,
    pad_ids,
    truncate_left,
    truncate_pair_left,
)

from helpers import (
    make_model,
    make_tokenizer,
)


def sentencepiece_style_tokenizer():
    """A subword tokenizer with a legacy SentencePiece normaliser: spaces become '▁' and a '▁' is
    prepended to every text, so "yes" alone is '▁yes' while after "Answer:" it is the piece '##yes'."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "▁Is", "▁it", "▁good?", "▁Answer:", "▁yes", "▁no", "##yes", "##no"]
    tok = Tokenizer(
        models.WordPiece(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>", continuing_subword_prefix="##")
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_answer_ids_are_the_joined_texts_ids_after_the_prompt():
    tok = sentencepiece_style_tokenizer()
    prompt, answer = "Is it good? Answer:", "yes"  # the paper protocol's join: no separator
    joined = tok(prompt + answer)["input_ids"]
    prompts, answers = encode_answers(tok, [prompt], [answer])
    assert prompts[0] + answers[0] == joined  # exactly the tokenization of the whole text
    assert answers[0] == [tok.convert_tokens_to_ids("##yes")]  # the read token is the answer's last token
    # Tokenizing the answer on its own gives another piece: the normaliser prepends '▁'.
    assert tok(answer, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("▁yes")] != answers[0]
    p, pos, neg = encode_pairs(tok, [prompt], ["yes"], ["no"])
    assert p[0] + pos[0] == joined and p[0] + neg[0] == tok(prompt + "no")["input_ids"]
    # With a space the answer is its own word: still the joined text's ids.
    assert encode_answers(tok, [prompt], [" yes"])[1] == [[tok.convert_tokens_to_ids("▁yes")]]


def test_left_truncation_keeps_the_read_token():
    assert truncate_left([1, 2, 3, 4, 5], 3) == [3, 4, 5] and truncate_left([1, 2], 3) == [1, 2]
    assert truncate_pair_left([1, 2, 3], [4, 5], 3) == ([3], [4, 5]) and truncate_pair_left([1, 2], [3, 4, 5], 2) == (
        [],
        [4, 5],
    )
    tok = make_tokenizer()
    batch = encode_texts(tok, ["a long prompt then the answer x", "short y"], max_length=5)
    last = batch["attention_mask"].sum(1) - 1
    assert [tok.convert_ids_to_tokens(int(batch["input_ids"][i, last[i]])) for i in range(2)] == ["x", "y"]
    assert batch["input_ids"].shape[1] == 5


def test_truncated_momentum_reads_the_answer_token():
    """With max_length set, the pass reads the same last-token units as the full sequences' last tokens."""
    from austeer_pl import accumulate_momentum, locate_units
    from austeer_pl.core.reading import ActivationReader

    model, tok = make_model("llama").double(), make_tokenizer()
    layout = locate_units(model)
    pairs = [("a very long prompt indeed, and yes", "a very long prompt indeed, and no")]
    acc = accumulate_momentum(model, tok, pairs, sites=["ffn"], layout=layout, max_length=8, shared_prefix=False)
    reader = ActivationReader(model, layout, ["ffn"])
    rows = []
    for text in pairs[0]:
        ids = tok(text)["input_ids"][-8:]
        rows.append(reader(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))["ffn"])
    assert torch.allclose(acc.mean_difference("ffn"), (rows[0] - rows[1])[0].double(), atol=1e-10)


def test_pad_ids_sides():
    ids, mask = pad_ids([[1, 2], [3]], 0, side="left")
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = pad_ids([[1, 2], [3]], 0, side="right")
    assert ids.tolist() == [[1, 2], [3, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def test_numeric_answers_are_the_last_number():
    from austeer_pl.scoring.generation import generation_prediction, parse_number

    assert parse_number("First 3 apples, then 4 more: 7") == 7.0  # the answer ends the reasoning
    assert parse_number("so #### 1,250 (after 2 steps)") == 1250.0 and parse_number("no digits") is None
    assert generation_prediction(" 12 - 5 = 7", ("7", "12"), numeric=True) == 0
