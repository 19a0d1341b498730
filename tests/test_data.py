import json

import pytest

from model.data import DatasetError, load_bbc, load_dataset, load_table

pytestmark = pytest.mark.unit


def test_bbc_corpus_has_2225_articles_in_5_classes():
    docs = load_bbc()
    assert len(docs) == 2225
    assert sorted({d.label for d in docs}) == ["business", "entertainment", "politics", "sports", "tech"]
    assert len({d.doc_id for d in docs}) == 2225
    assert docs[0].doc_id == "business/001" and docs[0].text.startswith("Ad sales boost")


def test_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('body,topic\n"hello, world",greet\nbye now,leave\n')
    docs = load_table(csv_path, text_field="body", label_field="topic")
    assert [(d.doc_id, d.text, d.label) for d in docs] == [
        ("row-1", "hello, world", "greet"), ("row-2", "bye now", "leave")]
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "a b", "label": 3}) + "\n\n" + json.dumps({"text": "c", "label": "x"}) + "\n")
    docs = load_dataset(str(jl))
    assert [(d.text, d.label) for d in docs] == [("a b", "3"), ("c", "x")]


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok", "label": "a"}\n{not json}\n', "row 2 is not valid JSON"),
    ('{"text": "ok", "label": "a"}\n{"text": "", "label": "a"}\n', "row 2 has no non-empty string field 'text'"),
    ('{"text": "ok", "label": null}\n', "row 1 has no non-empty label field 'label'"),
    ('[1, 2]\n', "row 1 is not an object"),
])
def test_jsonl_bad_rows_name_the_row(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_table(p)


def test_csv_missing_column_names_the_row(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("text,label\nfine,a\nno label here,\n")
    with pytest.raises(DatasetError, match="row 2 has no non-empty label field 'label'"):
        load_table(p)


def test_unknown_file_type_and_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="unsupported dataset type"):
        (tmp_path / "x.txt").write_text("hi")
        load_table(tmp_path / "x.txt")
    with pytest.raises(DatasetError, match="does not exist"):
        load_table(tmp_path / "nope.csv")
