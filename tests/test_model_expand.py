"""`kolm model expand`: a transformers-made Phi grown for an extended tokenizer keeps its old rows
bitwise and its logits over the old ids, starts each new token at the mean of its base pieces,
and gives its padding rows no probability."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.base_model import load_weights, make_base_model
from helpers.cli import run_kolm
from tokenizers import Tokenizer

from kolm.errors import KolmError
from kolm.model.expand import PAD_BIAS, expand_model
from kolm.model.presets import padded_vocab

ROWS = ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")


@pytest.fixture(scope="module")
def expanded(tmp_path_factory, base_phi, extended_tokenizer):
    out = tmp_path_factory.mktemp("expanded") / "model"
    report = expand_model(str(base_phi), str(extended_tokenizer), str(out))
    return out, report


def _lengths(base_tokenizer, extended_tokenizer):
    return (Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size(True)
            for d in (base_tokenizer, extended_tokenizer))


@pytest.mark.unit
def test_old_rows_are_bitwise_and_new_rows_are_the_mean_of_their_pieces(expanded, base_phi, base_tokenizer,
                                                                        extended_tokenizer):
    out, report = expanded
    base_len, ext_len = _lengths(base_tokenizer, extended_tokenizer)
    assert ext_len > base_len + 100
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == padded_vocab(ext_len) == report.rows_after
    assert config["kolm"]["base_vocab_size"] == base_len
    old, new = load_weights(base_phi), load_weights(out)
    assert set(old) == set(new)
    for name in ROWS:
        assert new[name].shape[0] == config["vocab_size"]
        assert torch.equal(new[name][:base_len], old[name][:base_len]), name
    for name in set(old) - set(ROWS):
        assert torch.equal(new[name], old[name]), name
    base, ext = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (base_tokenizer, extended_tokenizer))
    for new_id in (base_len, (base_len + ext_len) // 2, ext_len - 1):
        pieces = [t.id for t in base.model.tokenize(ext.id_to_token(new_id))]
        assert len(pieces) >= 2 and max(pieces) < base_len
        for name in ROWS:
            assert torch.allclose(new[name][new_id], old[name][pieces].mean(dim=0), atol=1e-7), (name, new_id)


@pytest.mark.unit
def test_padding_rows_take_no_probability(expanded, extended_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = expanded
    tok = AutoTokenizer.from_pretrained(str(out))
    ext_len = len(tok)
    weights = load_weights(out)
    assert weights["lm_head.bias"].shape[0] > ext_len, "the test needs padding rows"
    assert torch.all(weights["lm_head.bias"][ext_len:] == PAD_BIAS)
    assert torch.all(weights["lm_head.weight"][ext_len:] == 0)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        probs = model(**tok("대한민국 헌법 제1조", return_tensors="pt")).logits.softmax(-1)
    assert float(probs[..., ext_len:].sum(-1).max()) < 1e-30


@pytest.mark.unit
def test_logits_over_old_ids_match_the_base_model(expanded, base_phi, base_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = expanded
    assert report.max_logit_error < 1e-5
    ids = AutoTokenizer.from_pretrained(str(base_tokenizer))("Korean 한국어 text, 1234", return_tensors="pt")
    logits = []
    for d in (base_phi, out):
        with torch.no_grad():
            logits.append(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)(**ids).logits)
    base_len = len(AutoTokenizer.from_pretrained(str(base_tokenizer)))
    torch.testing.assert_close(logits[1][..., :base_len], logits[0][..., :base_len], rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_a_bf16_model_keeps_its_dtype_and_old_rows(tmp_path, base_tokenizer, extended_tokenizer):
    base = make_base_model(base_tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    expand_model(str(base), str(extended_tokenizer), str(tmp_path / "out"))
    old, new = load_weights(base), load_weights(tmp_path / "out")
    base_len, _ = _lengths(base_tokenizer, extended_tokenizer)
    for name in ROWS:
        assert new[name].dtype == torch.bfloat16 and torch.equal(new[name][:base_len], old[name][:base_len])


@pytest.mark.unit
def test_a_tokenizer_that_does_not_extend_the_base_is_refused(tmp_path, base_phi, tokenizer_dir):
    with pytest.raises(KolmError, match="does not extend"):
        expand_model(str(base_phi), str(tokenizer_dir), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.cli
def test_the_command_writes_once_and_refuses_to_overwrite(tmp_path, base_phi, extended_tokenizer):
    out = tmp_path / "grown"
    proc = run_kolm("model", "expand", "--model", base_phi, "--tokenizer", extended_tokenizer, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "copied bitwise" in proc.stdout and "verified" in proc.stdout
    before = (out / "model.safetensors").stat().st_mtime_ns
    again = run_kolm("model", "expand", "--model", base_phi, "--tokenizer", extended_tokenizer, "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    missing = run_kolm("model", "expand", "--model", tmp_path / "nope", "--tokenizer", extended_tokenizer,
                       "--out", tmp_path / "x")
    assert missing.returncode == 2 and "no config.json" in missing.stderr
