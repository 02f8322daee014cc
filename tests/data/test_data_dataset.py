"""PromptDataset: jsonl / parquet / saved datasets folders / builtin tasks, chat template,
length filtering, malformed rows, per-epoch shuffling and resume."""

import json
import logging

import pytest

from cispo.config import DataConfig
from launch.data import DataError, PromptDataset
from launch.tiny_model import build_char_tokenizer

ROWS = [{"prompt": f"q{i}?", "answer": i, "tests": [f"t{i}"]} for i in range(10)]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make(tok, path, tmp_path, **kw):
    return PromptDataset(DataConfig(path=path, **kw), tok, seed=kw.pop("seed", 0) if "seed" in kw else 0,
                         cache_dir=str(tmp_path / "hf_cache"))


def check_rows(ds, tok):
    items = ds.next_batch(len(ds))
    assert sorted(it.index for it in items) == list(range(10))
    for it in items:
        assert it.prompt_text == f"q{it.index}?"
        assert it.prompt_ids == tok(it.prompt_text)["input_ids"]
        assert it.answer == str(it.index)  # numbers become strings
        assert it.metadata == {"tests": [f"t{it.index}"]}


def test_jsonl(tok, tmp_path):
    check_rows(make(tok, write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path), tok)


def test_parquet(tok, tmp_path):
    import pandas as pd

    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    check_rows(make(tok, str(tmp_path / "d.parquet"), tmp_path), tok)


def test_saved_datasets_folder(tok, tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    check_rows(make(tok, str(tmp_path / "saved"), tmp_path), tok)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])}
                         ).save_to_disk(str(tmp_path / "dd"))
    check_rows(make(tok, str(tmp_path / "dd"), tmp_path), tok)


def test_custom_fields_and_chat_template(tok, tmp_path):
    rows = [{"question": "2+2=", "solution": "4"}, {"question": [{"role": "user", "content": "1+1="}], "solution": "2"}]
    ds = make(tok, write_jsonl(tmp_path / "c.jsonl", rows), tmp_path, prompt_field="question",
              answer_field="solution", apply_chat_template=True, shuffle=False)
    a, b = ds.next_batch(2)
    assert a.prompt_text == "user: 2+2=\nassistant: " and a.answer == "4"
    assert b.prompt_text == "user: 1+1=\nassistant: " and b.answer == "2"
    assert a.prompt_ids == tok(a.prompt_text, add_special_tokens=False)["input_ids"]
    no_answers = make(tok, write_jsonl(tmp_path / "n.jsonl", [{"prompt": "x"}]), tmp_path, answer_field="")
    assert no_answers.next_batch(1)[0].answer is None


def test_builtin_source(tok, tmp_path):
    ds = PromptDataset(DataConfig(path="builtin:arithmetic", difficulty=1), tok, seed=0, builtin_size=64)
    items = ds.next_batch(5)
    assert len(ds) == 64 and all(len(it.prompt_text) == 4 for it in items)
    assert all(it.metadata == {"task": "arithmetic", "difficulty": 1} for it in items)
    assert all(str(eval(it.prompt_text[:-1])) == it.answer for it in items)  # noqa: S307
    with pytest.raises(DataError, match="unknown built-in task 'nope'"):
        PromptDataset(DataConfig(path="builtin:nope"), tok)


def test_tokenizer_from_a_folder(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    ds = PromptDataset(DataConfig(path="builtin:sorting"), str(tmp_path / "tok"), builtin_size=8)
    assert ds.next_batch(1)[0].prompt_text.startswith("sort ")


def test_prompt_length_filter(tok, tmp_path, caplog):
    rows = [{"prompt": "x" * n, "answer": "a"} for n in (3, 10, 5, 20, 8)]
    with caplog.at_level(logging.WARNING, logger="cispo.data"):
        ds = make(tok, write_jsonl(tmp_path / "l.jsonl", rows), tmp_path, max_prompt_tokens=8)
    assert (ds.num_total, ds.num_dropped, len(ds)) == (5, 2, 3)
    assert sorted(it.index for it in ds.next_batch(3)) == [0, 2, 4]
    assert any("dropped 2 of 5 prompts" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="no usable prompts"):
        make(tok, str(tmp_path / "l.jsonl"), tmp_path, max_prompt_tokens=2)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "1"}, {"answer": "2"}],
         r"row 2: field 'prompt' is missing"),
        ([{"prompt": "a", "answer": "1"}, {"prompt": 5, "answer": "2"}], r"row 1: field 'prompt' must be a string, got int"),
        ([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "1"}, {"prompt": "b", "answer": "1"},
          {"prompt": "  ", "answer": "2"}], r"row 3: field 'prompt' is empty"),
        ([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], r"row 1: field 'answer' is missing"),
        ([{"text": "a", "answer": "1"}], r"row 0: missing field 'prompt' \(data.prompt_field\)"),
        ([{"prompt": "a"}], r"row 0: missing field 'answer' \(data.answer_field\)"),
    ],
)
def test_malformed_rows_name_row_and_field(tok, tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        make(tok, write_jsonl(tmp_path / "bad.jsonl", rows), tmp_path)


def test_broken_json_line_names_the_row(tok, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    with pytest.raises(DataError, match=r"row 1 \(line 2\) is not valid JSON"):
        make(tok, str(path), tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        make(tok, str(tmp_path / "missing.jsonl"), tmp_path)
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(DataError, match="unknown file type"):
        make(tok, str(tmp_path / "d.csv"), tmp_path)


def test_epochs_reshuffle_and_cover_every_row(tok):
    ds = PromptDataset(DataConfig(path="builtin:counting"), tok, seed=1, builtin_size=10)
    first = [it.index for it in ds.next_batch(4) + ds.next_batch(4) + ds.next_batch(2)]
    assert sorted(first) == list(range(10)) and ds.epoch == 0
    second = [it.index for b in (ds.next_batch(3), ds.next_batch(3), ds.next_batch(4)) for it in b]
    assert sorted(second) == list(range(10)) and ds.epoch == 1 and second != first
    crossing = ds.next_batch(15)  # epoch 2 and half of epoch 3
    assert ds.state_dict()["epoch"] == 3 and ds.state_dict()["position"] == 5
    assert sorted(it.index for it in crossing[:10]) == list(range(10))
    unshuffled = PromptDataset(DataConfig(path="builtin:counting", shuffle=False), tok, builtin_size=10)
    assert [it.index for it in unshuffled.next_batch(12)] == list(range(10)) + [0, 1]


def test_resume_continues_where_it_stopped(tok):
    cfg = DataConfig(path="builtin:arithmetic")
    a = PromptDataset(cfg, tok, seed=5, builtin_size=12)
    for _ in range(5):
        a.next_batch(5)  # 25 prompts: epoch 2, position 1
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip (driver_state.json)
    assert state["epoch"] == 2 and state["position"] == 1
    b = PromptDataset(cfg, tok, seed=5, builtin_size=12)
    b.load_state_dict(state)
    for _ in range(4):
        assert [it.index for it in b.next_batch(7)] == [it.index for it in a.next_batch(7)]
    assert b.state_dict() == a.state_dict()
