"""Which files an --input directory stands for: a Hugging Face `datasets` directory written by
`save_to_disk` is a corpus input too; hidden folders below a directory are not, nor is an unfinished
`kolm clean` output."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.cli import run_kolm
from transformers import AutoTokenizer

from kolm.data.corpus import find_inputs
from kolm.data.indexed import open_tokens, read_index
from kolm.data.manifest import load_shard_dir
from kolm.errors import KolmError


def _documents(shard_dir, tokenizer_dir) -> list[str]:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    sd = load_shard_dir(shard_dir)
    docs = []
    for entry in sd.manifest["shards"]:
        index = read_index(sd.shard_path(entry, ".idx"))
        tokens = open_tokens(sd.shard_path(entry, ".bin"), sd.dtype)
        for start, size in zip(index.pointers // sd.dtype.itemsize, index.sizes, strict=True):
            docs.append(tok.decode(np.asarray(tokens[start : start + size - 1])))
    return docs


@pytest.mark.cli
def test_saved_datasets_directory_is_read(tmp_path, korean_lines, tokenizer_dir):
    from datasets import Dataset

    lines = korean_lines[:300]
    saved = tmp_path / "saved"
    Dataset.from_dict({"id": list(range(len(lines))), "body": lines}).save_to_disk(str(saved))
    out = tmp_path / "shards"
    run_kolm("shard", "--input", saved, "--tokenizer", tokenizer_dir, "--out", out, "--text-field", "body",
             "--workers", 1, "--no-progress", check=True)
    assert sorted(_documents(out, tokenizer_dir)) == sorted(line.strip() for line in lines)
    wrong = run_kolm("shard", "--input", saved, "--tokenizer", tokenizer_dir, "--out", tmp_path / "x",
                     "--workers", 1, "--no-progress")
    assert wrong.returncode == 2 and "no column 'text'" in wrong.stderr and "--text-field" in wrong.stderr


def _write(path, text: str = '{"text": "안녕하세요"}\n'):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.unit
def test_hidden_folders_below_an_input_directory_are_skipped(tmp_path):
    d = tmp_path / "clean"
    kept = [_write(d / "00000.jsonl"), _write(d / "sub" / "a.txt", "가나다\n")]
    work = _write(d / ".work" / "prepared" / "00000.jsonl")  # an unfinished kolm clean's scratch
    _write(d / "sub" / ".cache" / "b.txt", "라마바\n")
    _write(d / ".notes.txt", "숨김\n")
    assert [f.path for f in find_inputs([str(d)])] == sorted(str(p.resolve()) for p in kept)
    assert [f.path for f in find_inputs([str(d / ".work")])] == [str(work.resolve())]  # named: read


@pytest.mark.unit
def test_an_unfinished_clean_output_is_refused_until_it_finishes(tmp_path):
    from kolm.data.clean import make_plan, prepare_output
    from kolm.data.clean_config import CleanConfig

    raw = _write(tmp_path / "raw.jsonl")
    out = tmp_path / "clean"
    plan, _ = make_plan([str(raw)], CleanConfig())
    prepare_output(out, plan, overwrite=False)
    part = _write(out / "00000.jsonl")  # the write stage under way
    with pytest.raises(KolmError, match="has not finished.*re-run that kolm clean command"):
        find_inputs([str(out)])
    _write(out / "report.json", "{}")
    assert [f.path for f in find_inputs([str(out)])] == [str(part.resolve())]
