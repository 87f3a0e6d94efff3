"""`kolm tokenizer train`: an offline-loadable byte-level BPE with <|endoftext|> as BOS/EOS/PAD."""

from __future__ import annotations

import unicodedata

import pytest
from helpers.cli import run_kolm

EOS = "<|endoftext|>"


@pytest.mark.cli
def test_cli_trains_loadable_tokenizer_and_reports_compression(tmp_path, korean_corpus, monkeypatch):
    out = tmp_path / "tok"
    proc = run_kolm("tokenizer", "train", "--input", korean_corpus, "--vocab-size", 1500, "--out", out, check=True)
    assert "characters per token" in proc.stdout and "held-back documents" in proc.stdout
    cpt = float(proc.stdout.split("compression: ")[1].split()[0])
    assert 1.0 < cpt < 6.0

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS
    assert len(tok) <= 1500
    text = "대한민국은 민주공화국이다."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS


@pytest.mark.unit
def test_decomposed_hangul_is_normalized_to_composed(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    composed = "헌법 제1조"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert tok(decomposed)["input_ids"] == tok(composed)["input_ids"]


@pytest.mark.cli
def test_existing_output_is_not_overwritten_without_force(tmp_path, korean_corpus):
    out = tmp_path / "tok"
    out.mkdir()
    keep = out / "mine.txt"
    keep.write_text("user data")
    proc = run_kolm("tokenizer", "train", "--input", korean_corpus, "--vocab-size", 1000, "--out", out)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert keep.read_text() == "user data"
    run_kolm("tokenizer", "train", "--input", korean_corpus, "--vocab-size", 1000, "--out", out, "--force", check=True)
    assert (out / "tokenizer.json").is_file() and not keep.exists()


@pytest.mark.cli
def test_bad_arguments_are_clear_errors(tmp_path, korean_corpus):
    small = run_kolm("tokenizer", "train", "--input", korean_corpus, "--vocab-size", 100, "--out", tmp_path / "a")
    assert small.returncode == 2 and "at least 512" in small.stderr
    nope = tmp_path / "nope.txt"
    missing = run_kolm("tokenizer", "train", "--input", nope, "--vocab-size", 1000, "--out", tmp_path / "b")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    empty = run_kolm("tokenizer", "train", "--input", blank, "--vocab-size", 1000, "--out", tmp_path / "c")
    assert empty.returncode == 2 and "holds no text" in empty.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.unit
@pytest.mark.parametrize(("option", "value"), [("min_frequency", -1), ("min_frequency", 0), ("max_documents", 0),
                                               ("max_documents", -3)])
def test_counts_below_one_are_refused_before_training(tmp_path, korean_corpus, option, value):
    from kolm.data.tokenizer import train_tokenizer
    from kolm.errors import KolmError

    flag = "--" + option.replace("_", "-")
    with pytest.raises(KolmError, match=f"{flag} {value}: must be at least 1"):
        train_tokenizer([str(korean_corpus)], tmp_path / "tok", 1000, progress=False, **{option: value})
    assert not (tmp_path / "tok").exists()


@pytest.mark.unit
def test_an_out_below_a_file_is_refused(tmp_path, korean_corpus):
    from kolm.data.tokenizer import train_tokenizer
    from kolm.errors import KolmError

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(KolmError, match="lies below .*notes.txt, which is a file"):
        train_tokenizer([str(korean_corpus)], a_file / "tok", 1000, progress=False)
    assert a_file.read_text() == "mine"
