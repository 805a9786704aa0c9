from alignkit.data.batching import collate_pairs, collate_sft
from alignkit.data.examples import PreferenceExample, SFTExample
from alignkit.data.tokenize import explain, render_texts, tokenize_pairs, tokenize_sft, truncate
from alignkit.testing import tiny_tokenizer

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}


def test_chat_template_completion_is_suffix_ending_in_eos():
    tok = tiny_tokenizer()
    p, c = render_texts(tok, (U("what is 2 plus 3 ?"),), (A("5 ."),), plain_text=True)
    assert p == "<|im_start|>user\nwhat is 2 plus 3 ?<|im_end|>\n<|im_start|>assistant\n"
    assert c == "5 .<|im_end|>"  # the template's trailing newline after the end-of-turn is cut


def test_no_template_plain_text_concatenates_and_appends_eos():
    tok = tiny_tokenizer(chat_template=False)
    ex = SFTExample((U("what is 2 plus 3 ?"),), (A("5"),), "x:1", plain_text=True)
    (item,), _ = tokenize_sft([ex], tok, 64)
    assert tok.decode(item.prompt_ids) == "what is 2 plus 3?"
    assert item.completion_ids == tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_pair_tokenization_scores_only_completions():
    tok = tiny_tokenizer()
    ex = PreferenceExample((U("what is 2 plus 3 ?"),), (A("5 ."),), (A("sorry ."),), "x:1", True)
    (item,), stats = tokenize_pairs([ex], tok, 64)
    assert tok.convert_ids_to_tokens(item.chosen_ids) == ["5", ".", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(item.rejected_ids) == ["sorry", ".", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(item.prompt_ids)[-2:] == ["<|im_start|>", "assistant"]
    assert stats.truncated == 0
    batch = collate_pairs([item, item], pad_id=tok.pad_token_id)
    n = len(item.prompt_ids)
    assert batch.segment_ids[0, :n].eq(-1).all() and batch.segment_ids[0, n : n + 3].tolist() == [0, 0, 0]
    assert batch.segment_ids[3, n : n + 3].tolist() == [3, 3, 3] and batch.num_segments == 4


def test_truncate_keeps_prompt_end_and_completion_start():
    prompt, (c1, c2), cut = truncate(list(range(100)), [list(range(200, 230)), list(range(300, 310))], 50, None)
    assert cut and prompt == list(range(75, 100))  # the last 25 = max_length // 2 prompt tokens
    assert c1 == list(range(200, 225)) and c2 == list(range(300, 310))
    prompt, (c,), cut = truncate(list(range(30)), [list(range(5))], 20, 8)
    assert prompt == list(range(15, 30)) and c == list(range(5))  # prompt keeps all the room left
    assert truncate([1, 2], [[3]], 10, None) == ([1, 2], [[3]], False)


def test_truncation_is_counted_and_reported():
    tok = tiny_tokenizer()
    long = " ".join(["the cat"] * 40)
    exs = [
        SFTExample((U(long),), (A("yes ."),), "f.jsonl:1", True),
        SFTExample((U("hello"),), (A("yes"),), "f.jsonl:2", True),
    ]
    items, stats = tokenize_sft(exs, tok, max_length=32)
    assert stats.truncated == 1 and items[0].truncated and not items[1].truncated
    assert len(items[0].prompt_ids) + len(items[0].completion_ids) == 32
    assert "truncated 1 (50.0%)" in stats.summary(32) and "f.jsonl:1" in stats.summary(32)


def test_explain_marks_scored_tokens():
    tok = tiny_tokenizer()
    ex = SFTExample((U("hello"),), (A("yes ."),), "x:1", True)
    (item,), _ = tokenize_sft([ex], tok, 64)
    text = explain(tok, item.prompt_ids, item.completion_ids)
    assert "completion: 3 tokens (scored)" in text
    assert "yes  'yes'" in text and "no   'assistant'" in text


def test_sft_collate_segments():
    tok = tiny_tokenizer()
    exs = [
        SFTExample((U("hello"),), (A("yes"),), "x:1", True),
        SFTExample((U("hello world"),), (A("no no"),), "x:2", True),
    ]
    items, _ = tokenize_sft(exs, tok, 64)
    batch = collate_sft(items, tok.pad_token_id)
    assert (batch.segment_ids == 0).sum() == 2 and (batch.segment_ids == 1).sum() == 3
    assert batch.num_tokens == sum(len(i.prompt_ids) + len(i.completion_ids) for i in items)
