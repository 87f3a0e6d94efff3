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
