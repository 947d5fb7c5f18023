"""The three data formats, their loss masks (checked position by position), packing, splits, bad rows."""

from __future__ import annotations

import json

import pytest

from svd_serve.dataset import IGNORE, Example, collate, collate_packed, encode, pack, read_jsonl, split
from svd_serve.errors import SvdServeError


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model("llama"))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def special(tok, name):
    return tok.convert_tokens_to_ids(name)


def test_text_row_trains_on_every_token(tok):
    e = encode({"text": "The cat sat on the mat."}, tok, 512)
    assert e.input_ids == ids(tok, "The cat sat on the mat.") + [tok.eos_token_id]
    assert e.labels == e.input_ids
    assert e.n_targets == len(e.input_ids) - 1 and not e.truncated


def test_prompt_completion_masks_the_prompt(tok):
    e = encode({"prompt": "Question: what is two plus two? Answer:", "completion": " four."}, tok, 512)
    prompt, completion = ids(tok, "Question: what is two plus two? Answer:"), ids(tok, " four.")
    assert e.input_ids == prompt + completion + [tok.eos_token_id]
    assert e.labels == [IGNORE] * len(prompt) + completion + [tok.eos_token_id]


def test_chat_loss_on_assistant_turns_only(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the capital of France?"},
            {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "and Germany?"},
            {"role": "assistant", "content": "Berlin"}]
    e = encode({"messages": msgs}, tok, 512)
    user, asst, end = special(tok, "<|user|>"), special(tok, "<|assistant|>"), special(tok, "<|end|>")
    # the template renders: system<end> <user>..<end> <assistant>Paris<end> <user>..<end> <assistant>Berlin<end>
    expected_ids, expected_labels = [], []
    for part, loss in [(ids(tok, "Be brief.") + [end], False),
                       ([user] + ids(tok, "the capital of France?") + [end], False),
                       ([asst], False), (ids(tok, "Paris") + [end], True),
                       ([user] + ids(tok, "and Germany?") + [end], False),
                       ([asst], False), (ids(tok, "Berlin") + [end], True)]:
        expected_ids += part
        expected_labels += part if loss else [IGNORE] * len(part)
    assert e.input_ids == expected_ids
    assert e.labels == expected_labels


def test_chat_without_template_is_a_clear_error(tok):
    bare = type(tok).from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(SvdServeError, match="chat template"):
        encode({"messages": [{"role": "user", "content": "hi"}]}, bare, 512)


def test_truncation_is_flagged(tok):
    e = encode({"prompt": "Paris is the capital of France.", "completion": " Berlin is the capital of Germany."},
               tok, 5)
    assert len(e.input_ids) == 5 and len(e.labels) == 5 and e.truncated
    assert e.labels == [IGNORE] * 5  # the completion was cut off entirely: no targets
    assert e.n_targets == 0


def test_pack_concatenates_and_masks_boundaries():
    a, b, c = Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [IGNORE, 5]), Example([6, 7, 8, 9], [6, 7, 8, 9])
    packed = pack([a, b, c], 6)
    assert [p.input_ids for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert packed[0].labels == [1, 2, 3, IGNORE, 5]  # 4 would be predicted from the previous row
    assert packed[1].labels == [6, 7, 8, 9]


def test_collate_pads_right_with_no_loss():
    batch = collate([Example([1, 2, 3], [1, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_packed_fills_rows_first_fit_longest_first():
    batch = collate_packed([Example([1, 2], [1, 2]), Example([3, 4, 5], [3, IGNORE, 5]), Example([6], [6])], pad_id=0)
    assert batch["input_ids"].tolist() == [[3, 4, 5], [1, 2, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 5], [IGNORE, 2, IGNORE]]  # no first token is a target
    assert "attention_mask" not in batch
    padded = collate_packed([Example([1, 2, 3], [1, 2, 3]), Example([4], [4])], pad_id=0)
    assert padded["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert padded["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]  # the padding is a sequence of its own
    assert padded["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]


def test_split_is_seeded_and_disjoint():
    rows = [{"text": str(i)} for i in range(40)]
    train, held = split(rows, 0.05, seed=3)
    assert len(held) == 2 and len(train) == 38
    assert sorted(r["text"] for r in train + held) == sorted(r["text"] for r in rows)
    assert split(rows, 0.05, seed=3) == (train, held) and split(rows, 0.05, seed=4) != (train, held)


@pytest.mark.parametrize("content, message", [
    ("", "has no rows"),
    ("\n\n", "has no rows"),
    ('{"text": "a"}\n{"txt": "b"}\n', ":2: expected"),
    ('{"text": 3}\n', "must be a string"),
    ('{"messages": []}\n', "non-empty list"),
    ('{"messages": [{"role": "user"}]}\n', "non-empty list"),
    ('{"text": "a"\n', ":1: malformed JSON"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(SvdServeError, match=message):
        read_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(SvdServeError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_good_file(tmp_path):
    rows = [{"text": "a"}, {"prompt": "p", "completion": "c"}, {"messages": [{"role": "user", "content": "x"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_jsonl(path) == rows
