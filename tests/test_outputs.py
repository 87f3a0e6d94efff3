"""No command's --out, even with --force, may replace the directory it reads from (or one above it):
the command stops before any work and the source is untouched. `kolm convert` is checked on real
checkpoints in tests/test_convert.py."""

from __future__ import annotations

import shutil

import pytest

from kolm.data.tokenizer import train_tokenizer
from kolm.data.tokenizer_extend import extend_tokenizer
from kolm.errors import KolmError
from kolm.files import refuse_output_over_sources
from kolm.model.expand import expand_model

pytestmark = pytest.mark.unit


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_output_equal_to_or_above_a_source_is_refused(tmp_path):
    source = tmp_path / "runs" / "a" / "checkpoints"
    source.mkdir(parents=True)
    for out in (source, source.parent, tmp_path / "runs", tmp_path / "runs" / "a" / "." / "checkpoints"):
        with pytest.raises(KolmError, match="which this command reads"):
            refuse_output_over_sources(out, tmp_path / "elsewhere", source)
    # Beside or below a source is fine: nothing it holds is replaced.
    refuse_output_over_sources(tmp_path / "runs" / "a" / "hf", source)
    refuse_output_over_sources(source / "export", source)
    refuse_output_over_sources(tmp_path / "runs" / "ab", tmp_path / "runs" / "a")


def test_tokenizer_train_into_its_corpus_directory_is_refused(tmp_path, korean_corpus):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(korean_corpus, corpus / "ko.txt")
    before = _snapshot(corpus)
    with pytest.raises(KolmError, match="which this command reads"):
        train_tokenizer([str(corpus)], corpus, vocab_size=600, force=True, progress=False)
    assert _snapshot(corpus) == before


def test_extend_and_expand_over_their_sources_are_refused(tmp_path, base_tokenizer, base_phi, extended_tokenizer,
                                                          korean_corpus):
    base, model = tmp_path / "base", tmp_path / "model"
    shutil.copytree(base_tokenizer, base)
    shutil.copytree(base_phi, model)
    before = (_snapshot(base), _snapshot(model))
    with pytest.raises(KolmError, match="which this command reads"):
        extend_tokenizer(str(base), [str(korean_corpus)], 10, str(base), force=True, progress=False)
    with pytest.raises(KolmError, match="which this command reads"):
        expand_model(str(model), str(extended_tokenizer), str(model), force=True)
    with pytest.raises(KolmError, match="which this command reads"):
        expand_model(str(model), str(extended_tokenizer), str(tmp_path), force=True)
    assert (_snapshot(base), _snapshot(model)) == before
