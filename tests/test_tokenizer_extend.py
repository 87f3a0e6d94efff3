"""`kolm tokenizer extend`: Korean tokens appended to an English byte-level BPE (a stand-in for Phi's),
every old id and every non-Korean encoding kept."""

from __future__ import annotations

import json
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from helpers.cli import run_kolm
from helpers.phi_source import EOS, english_documents

from kolm.data import tokenizer_extend as te
from kolm.errors import KolmError

ADD = 300
MIXED = [
    "대한민국은 민주공화국이다. The Republic of Korea is a democratic republic.",
    "제1조 ① 모든 국민은 1948년 7월 17일에  헌법을\t\t지킨다    (Article 1)",
    "def 함수(x):\n    return x + 1  # 한국어 주석 😀",
    "ㅋㅋㅋ 영화 진짜 재밌다!!! 10/10 ★★★★☆ ᄒᆞᆫ글 옛한글",
]
NON_KOREAN = [
    "The quick brown fox jumps over the lazy dog. 3.14159 2718281828 +1-555-0100 1,234,567.89",
    "def main(argv=None):\n    parser = argparse.ArgumentParser()\n\treturn 0  # comment\n",
    "東京都の天気は晴れです。北京欢迎你。Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    # characters whose UTF-8 encoding shares lead or continuation bytes with Hangul syllables
    "ꀀ ꙮ ꦲ ꓮ 啈 啊 卵 \ue000 ㄅㄆㄇ ㈀ ・ｱｲｳ 🙂🚀",
    "        indented by eight spaces, then two  and a tab\t\tdone",
]


def _load(directory: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, base_tokenizer) -> Path:
    """The base tokenizer inside a model directory, beside weights and the slow tokenizer's stale files."""
    d = tmp_path_factory.mktemp("phi-model") / "model"
    shutil.copytree(base_tokenizer, d)
    (d / "config.json").write_text(json.dumps({"model_type": "phi", "vocab_size": 1024}), encoding="utf-8")
    (d / "vocab.json").write_text("{}", encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def extended(tmp_path_factory, model_dir, korean_corpus) -> tuple[Path, te.ExtensionReport]:
    out = tmp_path_factory.mktemp("extended") / "tokenizer"
    return out, te.extend_tokenizer(model_dir, [str(korean_corpus)], ADD, out, progress=False)


@pytest.mark.unit
def test_every_base_token_keeps_its_id_and_new_ids_follow_the_base(extended, base_tokenizer):
    out, report = extended
    base, ext = _load(base_tokenizer), _load(out)
    base_len = base.get_vocab_size(with_added_tokens=True)
    assert base_len == 1005 and report.base_vocab_size == base_len
    assert report.added == ADD
    assert ext.get_vocab_size(with_added_tokens=True) == base_len + ADD
    for token, token_id in base.get_vocab(with_added_tokens=True).items():
        assert ext.token_to_id(token) == token_id and ext.id_to_token(token_id) == token
    new = {ext.id_to_token(i) for i in range(base_len, base_len + ADD)}
    assert None not in new and len(new) == ADD and not new & set(base.get_vocab(with_added_tokens=True))
    assert all(te.is_korean_token(token) for token in new)
    assert ext.get_added_tokens_decoder() == base.get_added_tokens_decoder()
    assert ext.token_to_id(EOS) == 999 and ext.get_added_tokens_decoder()[999].special

    base_spec = json.loads((base_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["model"]["type"] == "BPE" and spec["added_tokens"] == base_spec["added_tokens"]
    merges = spec["model"]["merges"]
    assert merges[:len(base_spec["model"]["merges"])] == base_spec["model"]["merges"]
    assert len(merges) == len(base_spec["model"]["merges"]) + report.merges
    assert all(isinstance(m, str) for m in merges)  # the base's "a b" format is kept
    record = te.read_extension(out)
    assert (record["format_version"], record["base_vocab_size"], record["added"], record["merges_added"]) == (
        1, base_len, ADD, report.merges)
    assert record["new_id_range"] == [base_len, base_len + ADD]


@pytest.mark.unit
def test_output_holds_the_tokenizer_and_its_config_but_no_slow_files(extended, model_dir):
    from kolm.data.tokenizer import load_tokenizer_info
    from kolm.files import sha256_file

    out, report = extended
    assert sorted(p.name for p in out.iterdir()) == ["kolm_extension.json", "special_tokens_map.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    record = te.read_extension(out)
    assert record["base"] == str(model_dir.resolve())
    assert record["base_tokenizer_sha256"] == sha256_file(model_dir / "tokenizer.json")
    info = load_tokenizer_info(out)
    assert info.vocab_size == report.base_vocab_size + ADD and info.eos_id == 999
    assert te.read_extension(model_dir) is None


@pytest.mark.unit
def test_auto_tokenizer_and_pipeline_load_the_extended_tokenizer(extended, base_tokenizer):
    import torch
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM, pipeline

    out, _ = extended
    base, tok = AutoTokenizer.from_pretrained(base_tokenizer), AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(base) + ADD
    assert (tok.eos_token, tok.bos_token, tok.unk_token) == (EOS, EOS, EOS) and tok.eos_token_id == 999
    text = MIXED[0]
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok(text)["input_ids"]) < len(base(text)["input_ids"])

    torch.manual_seed(0)
    config = PhiConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=64, eos_token_id=999, bos_token_id=999)
    generate = pipeline("text-generation", model=PhiForCausalLM(config), tokenizer=tok)
    result = generate("대한민국은", max_new_tokens=4, do_sample=False)
    assert result[0]["generated_text"].startswith("대한민국은")


@pytest.mark.unit
def test_decode_of_encode_returns_normalized_korean_and_mixed_text(extended, korean_lines):
    out, report = extended
    ext = _load(out)
    texts = korean_lines[::20] + MIXED
    texts = [unicodedata.normalize("NFC", t) for t in texts]
    for text in texts:
        assert ext.decode(ext.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    assert report.round_trips == report.sample_documents > 0


@pytest.mark.unit
def test_text_without_hangul_encodes_exactly_as_before(extended, base_tokenizer):
    out, report = extended
    base, ext = _load(base_tokenizer), _load(out)
    texts = NON_KOREAN + english_documents()[::25]
    for text in texts:
        assert ext.encode(text).ids == base.encode(text).ids, text
    assert report.non_korean_items > 0 and report.non_korean_changed == 0
    assert report.non_korean_source == "non-Hangul runs of the held-back text"


@pytest.mark.unit
def test_korean_text_compresses_better_and_the_report_says_so(extended):
    out, report = extended
    assert report.heldout_documents > 0
    assert report.base_chars_per_token < 0.6  # the English tokenizer spends a token per byte of Hangul
    assert report.chars_per_token > 2 * report.base_chars_per_token
    text = str(report)
    assert f"{ADD} new tokens, ids 1005..{1005 + ADD - 1}" in text
    assert f"{report.base_chars_per_token:.3f} -> {report.chars_per_token:.3f} characters per token" in text
    assert "0 of" in text and "(0.00%)" in text


@pytest.mark.unit
def test_korean_tokens_are_those_only_hangul_text_can_contain():
    from tokenizers import pre_tokenizers

    byte_level = {te.token_bytes(c)[0]: c for c in pre_tokenizers.ByteLevel.alphabet()}
    assert len(byte_level) == 256  # kolm's byte table is the tokenizers library's

    def token(data: bytes) -> str:
        return "".join(byte_level[b] for b in data)

    korean = ["안".encode(), b"\xec", b"\xeb\xa7", b"\xed", b"\xea\xb0", b" \xec", b"\xe1\x84", b"\xe3\x84\xb1",
              b"\xe3\x85", b"ab\xec\x95", b"\x95\x88\xec"]
    other = [b"ab", b"\xea", b"\xea\x80", b"\x95\x88", b"\xe1", b"\xe3\x84", b"\xe3", b"\xef", b"\xe5\x95\x88",
             "東京".encode(), b"\xf0\x9f\x98\x80", b"\xec\x41"]
    assert all(te.is_korean_token(token(b)) for b in korean)
    assert not any(te.is_korean_token(token(b)) for b in other)
    assert not te.is_korean_token("<|endoftext|>") and not te.is_korean_token("  ")


def _naive_merges(base, words: Counter, add: int, min_frequency: int) -> list[tuple[str, str]]:
    """BPE the slow way: recount every pair from scratch before each merge."""
    strings, new, merges = dict(base.strings), {}, []
    words_ids = [[t.id for t in base.tok.model.tokenize(w)] for w in words]
    counts = list(words.values())

    def eligible(p):
        s = strings[p[0]] + strings[p[1]]
        return s not in base.known and te.is_korean_token(s)

    while len(new) < add:
        pairs = Counter()
        for symbols, n in zip(words_ids, counts):
            for p in zip(symbols, symbols[1:]):
                if eligible(p):
                    pairs[p] += n
        if not pairs or max(pairs.values()) < min_frequency:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = strings[best[0]] + strings[best[1]]
        token_id = new.setdefault(merged, base.length + len(new))
        strings[token_id] = merged
        merges.append((strings[best[0]], strings[best[1]]))
        words_ids = [_merged(s, best, token_id) for s in words_ids]
    return merges


def _merged(symbols: list[int], pair: tuple[int, int], new: int) -> list[int]:
    out, i = [], 0
    while i < len(symbols):
        if symbols[i:i + 2] == list(pair):
            out.append(new)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


@pytest.mark.unit
def test_incremental_pair_counts_learn_what_recounting_learns(base_tokenizer, korean_lines):
    base = te._load_base(base_tokenizer)
    words = Counter(w for line in korean_lines[:200] for w in te._korean_words(base, line))
    for add, min_frequency in ((60, 2), (10_000, 12)):  # stopped by the count, then by the frequency
        learner = te._MergeLearner(base, min_frequency)
        learner.add_words(words)
        merges = [(learner.strings[a], learner.strings[b]) for a, b in learner.learn(add, progress=False)]
        assert merges == _naive_merges(base, words, add, min_frequency)
        assert 0 < len(merges) <= add


@pytest.mark.unit
def test_a_kolm_tokenizer_with_korean_already_in_it_can_be_extended(tmp_path, other_tokenizer, korean_corpus):
    out = tmp_path / "ext"
    report = te.extend_tokenizer(other_tokenizer, [str(korean_corpus)], 50, out, progress=False)
    base, ext = _load(other_tokenizer), _load(out)
    for token, token_id in base.get_vocab(with_added_tokens=True).items():
        assert ext.token_to_id(token) == token_id
    assert report.added == 50 and report.chars_per_token > report.base_chars_per_token
    assert ext.get_vocab_size(with_added_tokens=True) == base.get_vocab_size(with_added_tokens=True) + 50
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert all(isinstance(m, list) for m in spec["model"]["merges"])  # the base's [a, b] format is kept
    for text in NON_KOREAN:
        assert ext.encode(text).ids == base.encode(text).ids
    nfd = unicodedata.normalize("NFD", MIXED[0])  # this base normalizes to NFC itself
    assert ext.decode(ext.encode(nfd).ids) == MIXED[0]


@pytest.mark.unit
def test_a_malformed_extension_record_is_a_clear_error(tmp_path):
    (tmp_path / te.EXTENSION_FILE).write_text('{"format_version": 1}', encoding="utf-8")
    with pytest.raises(KolmError, match="not a kolm extension record"):
        te.read_extension(tmp_path)
    (tmp_path / te.EXTENSION_FILE).write_text("{", encoding="utf-8")
    with pytest.raises(KolmError, match="cannot be read"):
        te.read_extension(tmp_path)


@pytest.mark.cli
def test_cli_extends_and_kolm_shard_uses_the_result(tmp_path, base_tokenizer, korean_corpus):
    from kolm.data.manifest import load_shard_dir

    english = tmp_path / "english.txt"
    lines = [line for text in NON_KOREAN + english_documents()[:50] for line in text.splitlines() if line.strip()]
    english.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    proc = run_kolm("tokenizer", "extend", "--base", base_tokenizer, "--input", korean_corpus, "--add", 200,
                    "--out", out, "--non-korean", english, check=True)
    assert "200 new tokens, ids 1005..1204" in proc.stdout and "characters per token" in proc.stdout
    assert f"0 of {len(lines)} documents of --non-korean encode differently (0.00%)" in proc.stdout
    shards = tmp_path / "shards"
    run_kolm("shard", "--input", korean_corpus, "--tokenizer", out, "--out", shards, "--workers", 1,
             "--no-progress", check=True)
    fingerprint = load_shard_dir(shards).manifest["tokenizer"]
    assert fingerprint["vocab_size"] == 1205 and fingerprint["eos_id"] == 999
    verify = run_kolm("shard", "verify", shards, "--tokenizer", out)
    assert verify.returncode == 0, verify.stderr


def _wordlevel(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "대한민국": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.mark.cli
def test_bad_input_is_a_clear_error_and_overwrites_nothing(tmp_path, base_tokenizer, korean_corpus):
    def extend(*args, base=base_tokenizer, corpus=korean_corpus, add=50, out=tmp_path / "out"):
        return run_kolm("tokenizer", "extend", "--base", base, "--input", corpus, "--add", add, "--out", out, *args)

    blank, english = tmp_path / "blank.txt", tmp_path / "english.txt"
    blank.write_text("\n \n", encoding="utf-8")
    english.write_text("\n".join(english_documents()[:100]), encoding="utf-8")
    no_json = tmp_path / "slow-only"
    no_json.mkdir()
    cases = {
        "no such directory": extend(base=tmp_path / "missing"),
        "no tokenizer.json": extend(base=no_json),
        "its model is WordLevel; only byte-level BPE": extend(base=_wordlevel(tmp_path / "wordlevel")),
        "--add 0": extend(add=0),
        "holds no text": extend(corpus=blank),
        "no Korean pair of tokens occurs 2 times": extend(corpus=english),
        "no such file": extend(corpus=tmp_path / "nope.txt"),
        "no such file or directory": extend("--non-korean", tmp_path / "nope.txt"),
    }
    for message, proc in cases.items():
        assert proc.returncode == 2 and message in proc.stderr, (message, proc.stderr)
    assert not (tmp_path / "out").exists()

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("user data", encoding="utf-8")
    refused = extend(out=out)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    extend("--force", out=out).check_returncode()
    assert (out / "tokenizer.json").is_file() and not (out / "notes.txt").exists()


@pytest.mark.unit
@pytest.mark.parametrize("max_documents", [0, -1])
def test_max_documents_below_one_is_refused_before_learning(tmp_path, base_tokenizer, korean_corpus, max_documents):
    with pytest.raises(KolmError, match=f"--max-documents {max_documents}: must be at least 1"):
        te.extend_tokenizer(base_tokenizer, [str(korean_corpus)], 50, tmp_path / "out", max_documents=max_documents,
                            progress=False)
    assert not (tmp_path / "out").exists()
