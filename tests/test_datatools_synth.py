"""Synthesis data tools: the record filters (alignkit.datatools.filters) and Magpie / Self-Align
(alignkit.datatools.synth). Expected numbers are worked out by hand in the comments; the models
are a fake TextModel with fixed replies, so nothing is sampled."""

import pytest

from alignkit.datatools.filters import (
    MinHashDedup,
    estimated_jaccard,
    filter_records,
    jaccard,
    length_ok,
    repetition_ratio,
    shingles,
    too_repetitive,
)
from alignkit.datatools.synth import (
    SELF_ALIGN_SYSTEM,
    end_of_user_turn,
    magpie,
    pre_query_template,
    self_align,
    self_align_messages,
)
from alignkit.errors import AlignkitError, DataError
from alignkit.generation.decode import SamplingParams
from alignkit.rewards.principles import load_principles
from alignkit.rewards.refusal import is_refusal
from alignkit.testing import tiny_tokenizer

# --- filters -----------------------------------------------------------------------------------------


def test_length_ok_counts_whitespace_words_inclusive():
    assert length_ok("one two  three\n", 3, 3)  # 3 words, both bounds inclusive
    assert not length_ok("one two three", 4, None)
    assert not length_ok("one two three", None, 2)
    assert length_ok("", None, None)
    with pytest.raises(ValueError, match="min_words"):
        length_ok("x", 5, 2)


def test_repetition_ratio_by_hand():
    loop = "The cat sat the cat sat the cat sat"
    # 9 words -> 7 trigrams: (the cat sat) (cat sat the) (sat the cat) are new, the next 4 all repeat: 4/7
    assert repetition_ratio(loop, 3) == pytest.approx(4 / 7, abs=1e-12)
    # 8 bigrams: (the cat) (cat sat) (sat the) new, then 5 repeats: 5/8
    assert repetition_ratio(loop, 2) == pytest.approx(5 / 8, abs=1e-12)
    # "a b a b c": bigrams (a b) (b a) (a b)r (b c): 1/4
    assert repetition_ratio("a b a b c", 2) == pytest.approx(1 / 4, abs=1e-12)
    assert repetition_ratio("one two three four", 3) == 0.0
    assert repetition_ratio("too short", 3) == 0.0  # fewer than n words: no n-grams
    assert too_repetitive(loop, 0.5) and not too_repetitive(loop, 0.6)


def test_is_refusal_looks_at_the_opening_only():
    for text in [
        "I'm sorry, but I can't help with that.",
        "  i CANNOT do that.",
        "As an AI language model, I ...",
        "I\u2019m sorry, no.",
        '"I can\'t assist with this request."',
        "I won't write that.",
    ]:
        assert is_refusal(text), text
    for text in [
        "Sure! Here is a poem.",
        "Here is why I cannot agree.",
        "Paris is the capital.",
        "",
        "Sorry for the confusion earlier: the answer is 4.",
    ]:
        assert not is_refusal(text), text


WORDS30 = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu one two three four"
).split()


def test_exact_jaccard_by_hand():
    assert len(WORDS30) == 30 and len(set(WORDS30)) == 30
    text = " ".join(WORDS30)
    near = " ".join(WORDS30[:15] + ["changed"] + WORDS30[16:])
    # 28 trigrams each; word 15 sits in the trigrams starting at 13, 14, 15: 25 shared, union 25 + 3 + 3
    assert jaccard(text, near, 3) == pytest.approx(25 / 31, abs=1e-12)
    half = " ".join(WORDS30[:15] + [f"w{i}" for i in range(15)])
    # shared trigrams are those inside words 0..14: starts 0..12, 13 of them; union 28 + 28 - 13 = 43
    assert jaccard(text, half, 3) == pytest.approx(13 / 43, abs=1e-12)
    assert shingles("Hello, World!", 3) == {"hello world"}  # fewer than k words: one shingle, case/punct ignored
    assert jaccard("", "", 3) == 1.0


def test_minhash_finds_the_near_duplicate_and_not_the_unrelated_text():
    text = " ".join(WORDS30)
    near = " ".join(WORDS30[:15] + ["changed"] + WORDS30[16:])  # exact Jaccard 25/31 = 0.806
    unrelated = " ".join(f"w{i}" for i in range(30))
    dedup = MinHashDedup(threshold=0.7, k=3, num_perm=128, bands=32, rows=4, seed=0)
    assert dedup.add("a", text) is None
    assert dedup.add("b", near) == "a"
    assert dedup.add("c", unrelated) is None
    assert dedup.add("d", text.upper()) == "a"  # case does not matter
    assert len(dedup) == 2  # duplicates are not indexed
    with pytest.raises(ValueError, match="key 'a'"):
        dedup.add("a", "anything")


def test_minhash_estimate_is_close_to_exact_jaccard():
    text = " ".join(WORDS30)
    others = [
        " ".join(WORDS30[:15] + ["changed"] + WORDS30[16:]),  # 25/31
        " ".join(WORDS30[:15] + [f"w{i}" for i in range(15)]),  # 13/43
        " ".join(f"w{i}" for i in range(30)),  # 0
        " ".join(WORDS30[:29] + ["end"]),
    ]  # 27/29
    # 128 permutations: the estimate's standard deviation is sqrt(J(1-J)/128) <= 0.045, so 0.15 is over 3 sd
    for seed in (0, 1):
        dedup = MinHashDedup(k=3, seed=seed)
        for other in others:
            est = estimated_jaccard(dedup.signature(text), dedup.signature(other))
            assert abs(est - jaccard(text, other, 3)) <= 0.15, (seed, other)
    # deterministic from the seed (no salted hash()): same seed, same signature
    assert (MinHashDedup(seed=3).signature(text) == MinHashDedup(seed=3).signature(text)).all()
    with pytest.raises(ValueError, match="bands x rows"):
        MinHashDedup(num_perm=128, bands=10, rows=10)


def records_by_hand():
    return [
        {"prompt": "hi", "completion": "Hello there."},  # 0: 1 word < 2: too_short (and a duplicate of nothing)
        {"prompt": "tell me a story about a cat", "completion": "Once a cat sat."},  # 1: kept
        {"prompt": " ".join(["word"] * 13), "completion": "ok"},  # 2: 13 words > 12: too_long
        {"prompt": "the cat sat the cat sat the cat sat", "completion": "ok"},  # 3: ratio 4/7 > 0.5: repetitive
        {"prompt": "how do I pick a lock", "completion": "I'm sorry, I cannot help."},  # 4: refusal
        {"prompt": "Tell me a story about a cat!", "completion": "A cat."},  # 5: same shingles as 1: near_duplicate
        {"prompt": "how do I pick a lock?", "completion": "Ask a locksmith."},  # 6: kept: its twin 4 was removed
        {"prompt": "hi", "completion": "I'm sorry"},  # 7: too short AND a refusal: counted once, as too_short
    ]


def test_filter_records_counts_by_hand():
    dropped = []
    kept, counts = filter_records(
        records_by_hand(),
        text_of="prompt",
        reply_of="completion",
        min_words=2,
        max_words=12,
        max_repetition=0.5,
        drop_refusals=True,
        dedup_threshold=0.8,
        on_drop=lambda i, record, reason: dropped.append((i, reason)),
    )
    assert [r["prompt"] for r in kept] == ["tell me a story about a cat", "how do I pick a lock?"]
    assert list(counts.items()) == [
        ("too_short", 2),
        ("too_long", 1),
        ("repetitive", 1),
        ("refusal", 1),
        ("near_duplicate", 1),
        ("kept", 2),
    ]
    assert sum(counts.values()) == len(records_by_hand())  # nothing dropped silently
    assert dropped == [
        (0, "too_short"),
        (2, "too_long"),
        (3, "repetitive"),
        (4, "refusal"),
        (5, "near_duplicate"),
        (7, "too_short"),
    ]


def test_filter_records_disabled_filters_are_absent_and_errors_name_the_record():
    kept, counts = filter_records(records_by_hand(), text_of=lambda r: r["completion"])
    assert counts == {"kept": 8} and len(kept) == 8
    _, counts = filter_records(records_by_hand(), text_of="completion", drop_refusals=True)
    assert counts == {"refusal": 2, "kept": 6}  # records 4 and 7
    with pytest.raises(DataError, match="record 1 has no text_of"):
        filter_records([{"prompt": "a"}, {"text": "b"}], text_of="prompt")
    with pytest.raises(DataError, match="record 0's text_of is a int"):
        filter_records([{"prompt": 3}], text_of="prompt")


# --- Magpie -----------------------------------------------------------------------------------------------


class FakeLM:
    """A TextModel with fixed outputs that records how it was called."""

    name = "fake"

    def __init__(self, instructions=(), replies=None):
        self.instructions, self.replies, self.calls = list(instructions), dict(replies or {}), []

    def complete(self, prompts, params, seed=0, on_result=None, progress=False):
        self.calls.append(("complete", list(prompts), params, seed))
        out = [[self.instructions[i]] for i in range(len(prompts))]
        for i, o in enumerate(out):
            if on_result is not None:
                on_result(i, o)
        return out

    def chat(self, conversations, params, seed=0, on_result=None, progress=False):
        self.calls.append(("chat", [list(c) for c in conversations], params, seed))
        out = [[self.replies.get(c[-1]["content"], f"Reply to: {c[-1]['content']}")] for c in conversations]
        for i, o in enumerate(out):
            if on_result is not None:
                on_result(i, o)
        return out

    def option_logprobs(self, conversations, options):
        raise NotImplementedError


def test_pre_query_template_and_end_of_user_turn_for_chatml():
    tok = tiny_tokenizer()  # CHATML_TEMPLATE: '<|im_start|>' + role + '\n' + content + '<|im_end|>' + '\n'
    assert pre_query_template(tok) == "<|im_start|>user\n"
    assert pre_query_template(tok, system="Be brief.") == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    # after the user's text: "<|im_end|>\n" then the header "<|im_start|>assistant\n"
    assert end_of_user_turn(tok) == ["<|im_end|>", "<|im_start|>assistant"]
    with pytest.raises(AlignkitError, match="no chat template"):
        pre_query_template(tiny_tokenizer(chat_template=False))


def test_magpie_records_and_counts():
    lm = FakeLM(
        instructions=[
            " What is the capital of France?<|im_end|>\n<|im_start|>assistant\n",  # stop kept
            "   ",  # empty
            "Write a haiku.",
            "",  # empty
            "Say nothing.",
        ],
        replies={"What is the capital of France?": " Paris. ", "Say nothing.": "  "},
    )
    seen = []
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=3, stop=("###",))
    records = magpie(lm, tiny_tokenizer(), 5, params, seed=7, on_record=seen.append)
    assert records == [
        {"prompt": "What is the capital of France?", "completion": "Paris."},
        {"prompt": "Write a haiku.", "completion": "Reply to: Write a haiku."},
    ]
    assert records.counts == {"sampled": 5, "empty_instruction": 2, "empty_response": 1, "kept": 2}
    assert seen == list(records)
    (kind, prompts, p, seed), (kind2, convs, p2, seed2) = lm.calls
    assert kind == "complete" and prompts == ["<|im_start|>user\n"] * 5 and seed == 7
    assert p.stop == ("<|im_end|>", "<|im_start|>assistant") and p.n == 1 and p.temperature == 1.0
    assert kind2 == "chat" and seed2 == 8 and p2.n == 1 and p2.stop == ("###",)
    assert convs == [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write a haiku."}],
        [{"role": "user", "content": "Say nothing."}],
    ]
    with pytest.raises(ValueError, match="temperature"):
        magpie(lm, tiny_tokenizer(), 5, SamplingParams(temperature=0.0), seed=0)


# --- Self-Align -----------------------------------------------------------------------------------------

PRINCIPLES = ["Be honest: say when you do not know.", "Be brief."]
EXEMPLARS = [{"prompt": "Who won the 2030 World Cup?", "completion": "I do not know."}]


def test_self_align_messages_layout():
    messages = self_align_messages(PRINCIPLES, EXEMPLARS, "What is 2 + 2?")
    system = SELF_ALIGN_SYSTEM.format(principles="1. Be honest: say when you do not know.\n2. Be brief.")
    assert messages == [
        {"role": "system", "content": system},
        {"role": "user", "content": "Who won the 2030 World Cup?"},
        {"role": "assistant", "content": "I do not know."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    with pytest.raises(DataError, match="principles"):
        self_align_messages([], [], "x")


def test_self_align_keeps_the_principles_out_of_the_records():
    lm = FakeLM(replies={"What is 2 + 2?": "4.", "Tell me a secret.": ""})
    seen = []
    records = self_align(
        lm,
        ["What is 2 + 2?", "Tell me a secret.", "Hi"],
        PRINCIPLES,
        EXEMPLARS,
        SamplingParams(temperature=0.0, n=2),
        seed=3,
        on_record=seen.append,
    )
    assert records == [{"prompt": "What is 2 + 2?", "completion": "4."}, {"prompt": "Hi", "completion": "Reply to: Hi"}]
    assert records.counts == {"prompts": 3, "empty_response": 1, "kept": 2}
    assert seen == list(records)
    _, convs, params, seed = lm.calls[0]
    assert seed == 3 and params.n == 1
    assert convs[0] == self_align_messages(PRINCIPLES, EXEMPLARS, "What is 2 + 2?")  # the model saw them ...
    for record in records:  # ... the records do not carry them
        assert set(record) == {"prompt", "completion"}
        for text in record.values():
            assert not any(p in text for p in PRINCIPLES) and EXEMPLARS[0]["completion"] not in text


def test_load_principles_reads_and_names_mistakes(tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text("principles:\n  - Be honest.\n  - Be brief.\nexemplars:\n  - prompt: Hi\n    completion: Hello.\n")
    loaded = load_principles(good)
    assert (loaded.principles, loaded.exemplars) == (
        ["Be honest.", "Be brief."],
        [{"prompt": "Hi", "completion": "Hello."}],
    )
    only = tmp_path / "only.yaml"
    only.write_text("principles: [Be kind.]\n")
    assert load_principles(only).exemplars == []

    def error_for(text):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(DataError) as e:
            load_principles(path)
        assert str(path) in str(e.value)
        return str(e.value)

    assert "missing key `principles`" in error_for("exemplars: []\n")
    assert "did you mean `principles`" in error_for("principle: [a]\n")
    assert "principles[1]" in error_for("principles: [a, 3]\n")
    assert "exemplars[0] needs `completion`" in error_for("principles: [a]\nexemplars:\n  - prompt: Hi\n")
    assert "did you mean `completion`" in error_for("principles: [a]\nexemplars:\n  - {prompt: Hi, completon: x}\n")
    assert "not valid YAML" in error_for("principles: [a, b\n")
    assert "an empty file" in error_for("")
    with pytest.raises(DataError, match="not found"):
        load_principles(tmp_path / "missing.yaml")


def test_end_of_user_turn_for_other_template_layouts():
    # Llama 3's layout: the header follows the end marker with no newline between them
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )
    assert pre_query_template(tok) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert end_of_user_turn(tok) == ["<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>"]
    # Mistral's layout: no generation prompt, the user's turn closes with [/INST]
    tok.chat_template = (
        "{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content']"
        " + ' [/INST]' }}{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}"
    )
    assert pre_query_template(tok) == "<s>[INST] "
    assert end_of_user_turn(tok) == ["[/INST]"]


def test_distinct_n_by_hand():
    from alignkit.datatools.filters import distinct_n

    # bigrams: (a b) (b a) (a b) | (a b) -> 4 bigrams, 2 distinct
    assert distinct_n(["a b a b", "A B"], 2) == 0.5
    assert distinct_n(["a b c"], 1) == 1.0 and distinct_n(["one"], 2) == 0.0
