"""`kolm clean`: normalization, Korean filters, PII masking, exact and near dedup on datatrove; the
same output for any worker count and after a kill; output that `kolm shard` reads as it is."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from helpers import clean_corpus
from helpers.clean_corpus import ORDINARY, PII, read_output
from helpers.shard import assert_user_error, clean_env, kolm, manifest, shard

from kolm.data.clean_config import FilterConfig, preset
from kolm.data.clean_normalize import normalize_text

UNIT = "4k"  # several tasks even for this small corpus


def clean(inputs, out, *options, check: bool = True, env=None) -> subprocess.CompletedProcess:
    args = ["clean", "--input", *map(str, inputs), "--out", str(out), "--no-progress", "--unit-bytes", UNIT, *options]
    return kolm(*args, check=check, env=env)


def tree(out: Path) -> dict[str, bytes]:
    """Every file of a clean output (relative path → bytes)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    return clean_corpus.write(tmp_path_factory.mktemp("clean-corpus"))


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory, corpus) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("clean") / "out"
    return out, clean(corpus, out, "--workers", "1")


# --------------------------------------------------------------------------- unit: the pieces


@pytest.mark.unit
def test_normalization_makes_nfd_crlf_and_spacing_copies_identical():
    text = "대한민국은  민주공화국이다.\r\n\n\n\n모든\u00a0권력은\t국민으로부터 나온다.\u200b  "
    expected = "대한민국은 민주공화국이다.\n\n모든 권력은 국민으로부터 나온다."
    assert normalize_text(unicodedata.normalize("NFD", text)) == expected
    assert normalize_text("a\x00b\x1fc") == "abc"


@pytest.mark.unit
def test_pii_masking_replaces_every_kind_and_leaves_ordinary_numbers():
    from kolm.data.clean_pii import PiiMasker

    counts: Counter = Counter()
    masker = PiiMasker(("rrn", "phone", "card", "account", "email"))
    for value, token, template in PII:
        masked = masker(template.format(value), counts)
        assert value not in masked and token in masked, (value, masked)
    text = "행사는 " + ", ".join(ORDINARY) + " 에 열립니다. 우리 은행은 2023년에 1,000억원을 벌었다."
    assert masker(text, counts) == text
    assert sum(counts.values()) == len(PII)


@pytest.mark.unit
def test_rrn_without_hyphen_needs_a_valid_checksum_and_a_real_date():
    from kolm.data.clean_pii import PiiMasker

    masker, counts = PiiMasker(("rrn",)), Counter()
    good = clean_corpus.rrn_with_checksum("900101123456")
    bad_check = good[:-1] + str((int(good[-1]) + 1) % 10)
    assert masker(f"번호 {good}", counts) == "번호 <|rrn|>"
    assert masker(f"번호 {bad_check}", counts) == f"번호 {bad_check}"
    assert masker("번호 901332-1234567", counts) == "번호 901332-1234567"  # no 32nd day


@pytest.mark.unit
def test_filters_name_the_check_that_failed():
    from datatrove.data import Document

    from kolm.data.clean_filters import QualityFilter

    f = QualityFilter("/nonexistent", FilterConfig())

    def why(text: str) -> str | None:
        return f.check(Document(text=normalize_text(text), id="x"))

    rng = __import__("random").Random(1)
    good = clean_corpus.document(rng)
    assert why(good) is None
    names = [why(t) for t in clean_corpus.junk(rng)]
    assert names == ["runs", "runs", "length", "hangul", "repetition", "boilerplate", "spam", "repetition"]
    doc = Document(text="정말 재밌어요ㅋㅋㅋㅋㅋㅋㅋ 또 보고 싶다!!!!!!", id="y")
    assert f.check(doc) is None and doc.text == "정말 재밌어요ㅋㅋㅋ 또 보고 싶다!!!"


@pytest.mark.unit
def test_kiwi_words_load_offline_with_the_shipped_model(monkeypatch):
    from kolm.data.clean_filters import KiwiWords, repetition_failure

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = KiwiWords()("학교에 갔습니다")
    assert "학교" in words and "에" in words
    cfg = FilterConfig(words="kiwi")
    assert repetition_failure(" ".join(["구매 문의 환영합니다"] * 20), cfg, KiwiWords())
    assert not repetition_failure(clean_corpus.document(__import__("random").Random(2)), cfg, KiwiWords())


@pytest.mark.unit
def test_settings_tune_and_turn_off_checks():
    cfg = preset(overrides=["min_chars=50", "min_hangul_share=0", "spam_phrases=광고,홍보", "pii=rrn,email"])
    assert cfg.filters.min_chars == 50 and cfg.filters.min_hangul_share == 0.0
    assert cfg.filters.spam_phrases == ("광고", "홍보") and cfg.pii == ("rrn", "email")
    assert preset(filters="none", pii="keep", dedup="exact").pii == ()
    from kolm.errors import KolmError

    with pytest.raises(KolmError, match="no such setting"):
        preset(overrides=["min_char=5"])


@pytest.mark.unit
def test_near_duplicate_shingles_ignore_spacing():
    from kolm.data.clean_dedup import char_shingles

    a = char_shingles("대한민국은 민주공화국이다", 5)
    b = char_shingles("대한 민국은 민주 공화국이다", 5)
    assert a.shape[1] == 1 and len(a) == len("대한민국은민주공화국이다") - 4
    assert (a == b).all()


@pytest.mark.unit
def test_batched_signatures_are_datatrove_step_one_byte_for_byte(tmp_path):
    import random

    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    from kolm.data.clean_config import DedupConfig
    from kolm.data.clean_dedup import KoreanMinhashSignature, char_shingles, minhash_config

    class PerDocument(MinhashDedupSignature):  # datatrove's own step 1, with the same shingles
        def get_shingles(self, text):
            return char_shingles(text, 5)

    rng = random.Random(0)
    texts = ["".join(chr(0xAC00 + rng.randrange(300)) for _ in range(rng.randint(1, 300))) for _ in range(300)]
    texts += ["", " ", "가나"]
    cfg = minhash_config(DedupConfig())
    for folder, held in (("batched", 1 << 27), ("spilled", 3000)):  # sorted in memory, or from the files
        batched = KoreanMinhashSignature(str(tmp_path / folder), cfg)
        batched.BATCH_SHINGLES, batched.BLOCK_ROWS, batched.HELD_BYTES = 2000, 50, held  # several batches, blocks
        batched.run(Document(text=t, id=str(i)) for i, t in enumerate(texts))
    PerDocument(str(tmp_path / "datatrove"), config=cfg, language="ko").run(
        Document(text=t, id=str(i)) for i, t in enumerate(texts))
    for bucket in range(cfg.num_buckets):
        name = f"bucket_{bucket:03d}/00000.minhash.sig"
        assert (tmp_path / "batched" / name).read_bytes() == (tmp_path / "datatrove" / name).read_bytes()
        assert (tmp_path / "spilled" / name).read_bytes() == (tmp_path / "datatrove" / name).read_bytes()


@pytest.mark.unit
def test_vectorized_buckets_write_datatrove_step_two_pairs_byte_for_byte(tmp_path):
    import random

    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    from kolm.data.clean_config import DedupConfig
    from kolm.data.clean_dedup import KoreanMinhashSignature, MinhashBuckets, minhash_config

    rng = random.Random(3)
    base = [clean_corpus.document(rng, 2) for _ in range(40)]
    cfg = minhash_config(DedupConfig())
    for task in range(3):  # three tasks sharing exact and near copies
        texts = [t if rng.random() < 0.5 else clean_corpus.near_copy(t, rng) for t in rng.sample(base, 25)]
        KoreanMinhashSignature(str(tmp_path / "sigs"), cfg).run(
            (Document(text=t, id=str(i)) for i, t in enumerate(texts)), rank=task)
    for bucket in range(cfg.num_buckets):
        fast = MinhashBuckets(str(tmp_path / "sigs"), str(tmp_path / "fast"), config=cfg)
        fast.WINDOW_RECORDS = 7  # many hash windows
        fast.run(rank=bucket, world_size=cfg.num_buckets)
        MinhashDedupBuckets(str(tmp_path / "sigs"), str(tmp_path / "datatrove"), config=cfg).run(
            rank=bucket, world_size=cfg.num_buckets)
    names = sorted(p.name for p in (tmp_path / "datatrove").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "fast").iterdir()) and len(names) == cfg.num_buckets
    pairs = 0
    for name in names:
        want = (tmp_path / "datatrove" / name).read_bytes()
        assert (tmp_path / "fast" / name).read_bytes() == want
        pairs += len(want) // 16
    assert pairs > 20  # the copies were found


@pytest.mark.unit
def test_batched_filters_decide_as_one_document_at_a_time():
    import random

    from datatrove.data import Document

    from kolm.data.clean_filters import QualityFilter

    rng = random.Random(5)
    texts = [clean_corpus.document(rng, rng.randint(1, 3)) for _ in range(60)] + clean_corpus.junk(rng)
    texts += ["ㅋ" * rng.randint(1, 9) + clean_corpus.sentence(rng, rng.randint(0, 4)) for _ in range(40)]
    texts += ["abc def", "Ünïcödé ΣΑΣ 𝔘𝔫𝔦 ½ ², 가나다라마바사", "", "로그인\n회원가입\n" + clean_corpus.sentence(rng)]
    texts = [normalize_text(t) for t in texts]
    rng.shuffle(texts)
    f = QualityFilter("/nonexistent", FilterConfig())
    one = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    many = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    assert f.check_batch(many) == [f.check(d) for d in one]
    assert [d.text for d in many] == [d.text for d in one]
    assert {"runs", "length", "hangul", "repetition", "boilerplate", "spam", None} <= set(f.check_batch(
        [Document(text=t, id="") for t in texts]))


@pytest.mark.unit
def test_batched_shingles_are_each_texts_own():
    import random

    import numpy as np

    from kolm.data.clean_dedup import batch_shingles, char_shingles

    rng = random.Random(7)
    alphabet = ["가", "각", "a", "A", "Σ", "İ", "ß", " ", "\n", "\t", "\u3000", "\u00a0", "\u2028", "\ue000", "1"]
    for _ in range(300):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(rng.randrange(8))]
        if rng.random() < 0.8:  # mostly without the private-use joiner (the fast path)
            texts = [t.replace("\ue000", "") for t in texts]
        shingles, counts = batch_shingles(texts, 3)
        parts = [char_shingles(t, 3).ravel() for t in texts]
        assert list(counts) == [len(p) for p in parts]
        assert shingles.tolist() == (np.concatenate(parts).tolist() if parts else [])


@pytest.mark.unit
def test_sort_order_is_lexsort_for_unique_keys():
    import numpy as np

    from kolm.data.clean_dedup import sort_order

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 80))
        keys = [rng.integers(0, int(rng.integers(1, 4)), n).astype(np.uint64) for _ in range(3)]
        keys.append(rng.permutation(n).astype(np.uint32))  # the document index makes rows unique
        assert (sort_order(keys) == np.lexsort(keys[::-1])).all()


@pytest.mark.unit
def test_the_write_stage_gives_the_file_that_rewriting_each_record_gives(tmp_path):
    import random

    import numpy as np
    from datatrove.data import Document

    from kolm.data.clean_io import JsonlGzWriter, PreparedWriter

    rng = random.Random(9)
    records = [{"id": i, "text": clean_corpus.sentence(rng, rng.randint(1, 30)), "meta": {"n": [i, 0.5, None]}}
               for i in range(300)]

    def docs(keep=lambda i: True):
        return (Document(text=r["text"], id=str(i), metadata={"record": dict(r)}) for i, r in enumerate(records)
                if keep(i))

    JsonlGzWriter.BLOCK = 500  # many compressor blocks
    try:
        list(JsonlGzWriter(str(tmp_path / "counts"), str(tmp_path / "prepared"), "text", level=0,
                           step_name="prepared").run(docs(), rank=3))
        dropped = sorted(rng.sample(range(300), 40))
        PreparedWriter(str(tmp_path / "counts"), str(tmp_path / "prepared"), str(tmp_path / "fast"), "text",
                       lambda rank, lines: np.array(dropped), "after").run(rank=3)
        list(JsonlGzWriter(str(tmp_path / "counts2"), str(tmp_path / "slow"), "text").run(
            docs(lambda i: i not in dropped), rank=3))
    finally:
        JsonlGzWriter.BLOCK = 1 << 20
    assert (tmp_path / "fast/00003.jsonl.gz").read_bytes() == (tmp_path / "slow/00003.jsonl.gz").read_bytes()
    fast = json.loads((tmp_path / "counts/write-00003.json").read_text())["counts"]
    assert fast == json.loads((tmp_path / "counts2/write-00003.json").read_text())["counts"]
    assert json.loads((tmp_path / "counts/after-00003.json").read_text())["counts"] == {"documents": 260}


# --------------------------------------------------------------------------- cli: the whole command


@pytest.mark.cli
def test_duplicates_pii_and_junk_are_removed_and_the_rest_survives(cleaned):
    out, proc = cleaned
    assert proc.returncode == 0, proc.stderr
    records = read_output(out)
    by_group = Counter(r["group"] for r in records)
    first, second = clean_corpus.build()
    for r in first + second:
        if r["kind"] in ("distinct", "original", "pii", "numbers"):
            assert by_group[r["group"]] == 1, f"group {r['group']} kept {by_group[r['group']]} times"
    junk = [r for r in second if r["kind"] == "junk"]
    assert sum(by_group[r["group"]] for r in junk) <= len(junk) // 5
    texts = "\n".join(r["text"] for r in records)
    for value, token, _ in PII:
        assert value not in texts
        assert token in texts
    for number in ORDINARY:
        assert number in texts, number
    distinct = [r for r in records if r["kind"] == "distinct"]
    assert all(r["url"].startswith("https://example.kr/") for r in distinct)  # other fields kept


@pytest.mark.cli
def test_the_report_adds_up(cleaned):
    out, proc = cleaned
    report = json.loads((out / "report.json").read_text())
    docs = report["documents"]
    assert docs["read"] == sum(len(part) for part in clean_corpus.build())
    assert docs["read"] == docs["kept"] + sum(report["removed"].values())
    assert docs["kept"] == len(read_output(out))
    groups = 8
    assert report["removed"]["exact_duplicate"] == 2 * groups and report["removed"]["near_duplicate"] == groups
    assert report["pii"] == dict(Counter(token.strip("<|>") for _, token, _ in PII))
    assert report["bytes"]["written"] < report["bytes"]["read"]
    assert (out / "removed" / "runs.json").is_file() and not (out / ".work").exists()
    for line in ("kept", "removed by exact_duplicate", "PII masked: "):
        assert line in proc.stdout


@pytest.mark.cli
def test_one_and_two_workers_give_identical_output(tmp_path, corpus, cleaned):
    out = tmp_path / "two"
    clean(corpus, out, "--workers", "2")
    assert tree(out) == tree(cleaned[0])
    assert len(list(out.glob("*.jsonl.gz"))) > 2


@pytest.mark.cli
def test_a_killed_run_continues_to_the_same_output(tmp_path, corpus, cleaned):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "kolm", "clean", "--input", *map(str, corpus), "--out", str(out), "--no-progress",
            "--unit-bytes", UNIT, "--workers", "1"]
    proc = subprocess.Popen(args, env=clean_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = out / ".work" / "logs" / "prepare" / "completions"  # killed once the first task is done
    deadline = time.monotonic() + 120
    while not (done.is_dir() and any(done.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists(), "the run finished before it could be killed"
    clean(corpus, out, "--workers", "2")
    assert tree(out) == tree(cleaned[0])
    again = clean(corpus, out, "--workers", "1")
    assert "already complete" in again.stderr


@pytest.mark.cli
def test_the_output_shards_and_trains_a_tokenizer(tmp_path, cleaned, tokenizer_dir):
    out = cleaned[0]
    shards = tmp_path / "shards"
    shard([out], tokenizer_dir, shards, "--workers", "1", "--valid-fraction", "0")
    kept = json.loads((out / "report.json").read_text())["documents"]["kept"]
    assert manifest(shards)["corpus"]["documents"] == kept
    tok = tmp_path / "tok"
    kolm("tokenizer", "train", "--input", out, "--vocab-size", "600", "--out", tok, check=True)
    added = json.loads((tok / "tokenizer.json").read_text())["added_tokens"]
    assert {"<|rrn|>", "<|phone|>", "<|card|>", "<|account|>", "<|email|>"} <= {t["content"] for t in added}


def _books(folder: Path) -> list[Path]:
    """Two .txt files of one sentence per line, 3 and 2 paragraphs (books) separated by blank lines."""
    import random

    rng = random.Random(5)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, paragraphs in (("a.txt", 3), ("b.txt", 2)):
        books = ["\n".join(clean_corpus.sentence(rng) for _ in range(6)) for _ in range(paragraphs)]
        (folder / name).write_text("\n\n".join(books) + "\n", encoding="utf-8")
        paths.append(folder / name)
    return paths


@pytest.mark.cli
@pytest.mark.parametrize(("documents", "expected"), [("lines", 30), ("paragraphs", 5), ("files", 2)])
def test_documents_choice_sets_what_one_document_is_for_any_worker_count(tmp_path, documents, expected):
    books = _books(tmp_path / "books")
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out-{workers}"
        clean(books, out, "--documents", documents, "--workers", workers, "--unit-bytes", "512")
        outs.append(out)
    report = json.loads((outs[0] / "report.json").read_text())
    assert report["documents"]["kept"] == expected
    blank_lines = 3 if documents == "lines" else 0  # read as empty documents, removed
    assert report["documents"]["read"] - expected == report["removed"].get("empty", 0) == blank_lines
    assert tree(outs[0]) == tree(outs[1])
    texts = [r["text"] for r in read_output(outs[0])]
    assert all(t.count("\n") == (30 // expected) - 1 for t in texts if documents != "files")
    assert report["plan"]["config"]["documents"] == documents


# --------------------------------------------------------------------------- cli: bad input


@pytest.mark.cli
def test_a_malformed_line_is_named_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "첫 번째 문서입니다 충분히 길게"}\n{"text": 3}\n', encoding="utf-8")
    proc = clean([bad], tmp_path / "out", check=False)
    assert_user_error(proc, str(bad), "line 2", "--skip-malformed")


@pytest.mark.cli
def test_an_unreadable_input_is_refused(tmp_path, corpus):
    import shutil

    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root reads files whatever their permissions, and setpriv is not installed to drop that")
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    locked = tmp_path / "locked.jsonl"
    locked.write_bytes(corpus[0].read_bytes())
    locked.chmod(0)
    args = ["clean", "--input", str(locked), "--out", str(tmp_path / "out"), "--no-progress"]
    proc = subprocess.run([*drop, sys.executable, "-m", "kolm", *args], capture_output=True, text=True, env=clean_env())
    assert_user_error(proc, str(locked), "not readable")
    assert not (tmp_path / "out").exists()


@pytest.mark.cli
def test_a_missing_input_is_refused(tmp_path):
    proc = clean([tmp_path / "nope.txt"], tmp_path / "out", check=False)
    assert_user_error(proc, "nope.txt", "no such file")


@pytest.mark.cli
def test_an_output_dir_of_another_run_or_of_other_files_is_refused(tmp_path, corpus, cleaned):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("내 파일", encoding="utf-8")
    assert_user_error(clean(corpus, other, check=False), "not empty")
    assert (other / "notes.txt").read_text(encoding="utf-8") == "내 파일"
    previous = tmp_path / "previous"
    previous.mkdir()
    for name, data in tree(cleaned[0]).items():
        (previous / name).parent.mkdir(parents=True, exist_ok=True)
        (previous / name).write_bytes(data)
    proc = clean(corpus, previous, "--dedup", "exact", check=False)
    assert_user_error(proc, "another run", "--overwrite")
    assert tree(previous) == tree(cleaned[0])
    clean(corpus, previous, "--dedup", "exact", "--overwrite")
    report = json.loads((previous / "report.json").read_text())
    assert "near_duplicate" not in report["removed"]


@pytest.mark.unit
def test_overwrite_continues_the_same_plan_and_replaces_another(tmp_path):
    from kolm.data.clean import prepare_output

    out, plan = tmp_path / "out", {"format": 1, "inputs": [], "config": {}, "tasks": 2}
    (out / ".work" / "logs").mkdir(parents=True)
    (out / ".work" / "plan.json").write_text(json.dumps(plan))
    (out / ".work" / "logs" / "00001").write_text("task 1 finished")  # another array task's completion
    (out / "00001.jsonl.gz").write_bytes(b"task 1's output")
    before = tree(out)
    assert prepare_output(out, plan, overwrite=True) is False  # a requeued task 0
    assert tree(out) == before
    other = {**plan, "tasks": 3}
    assert prepare_output(out, other, overwrite=True) is False
    assert tree(out) == {".work/plan.json": (out / ".work" / "plan.json").read_bytes()}
    assert json.loads((out / ".work" / "plan.json").read_text()) == other


@pytest.mark.unit
@pytest.mark.parametrize(("kwargs", "needle"), [({"workers": -1}, "--workers -1"), ({"workers": 0}, "--workers 0"),
                                                ({"num_tasks": 0}, "--num-tasks 0")])
def test_bad_counts_are_refused_before_anything_is_written(tmp_path, corpus, kwargs, needle):
    from kolm.data.clean import run_clean
    from kolm.errors import KolmError

    with pytest.raises(KolmError, match=re.escape(needle)):
        run_clean([str(p) for p in corpus], tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.cli
@pytest.mark.parametrize("unit_bytes", ["0", "-4k"])
def test_a_unit_size_below_one_byte_is_refused(tmp_path, corpus, unit_bytes):
    proc = clean(corpus, tmp_path / "out", f"--unit-bytes={unit_bytes}", check=False)
    assert_user_error(proc, "unit_bytes must be positive")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- slurm: an array job


@pytest.mark.slurm
@pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster needs root (tools/local-slurm.sh)")
def test_a_slurm_array_job_gives_the_output_of_one_local_run(tmp_path, corpus, cleaned):
    from helpers.slurm_cluster import REPO, finished, sbatch, start_cluster, wait_job

    cluster = start_cluster()
    out = tmp_path / "clean"
    array = sbatch(cluster, "--array=0-1", "--cpus-per-task=1", REPO / "slurm/clean.sbatch", "--input", *corpus,
                   "--out", out, "--unit-bytes", UNIT, cwd=tmp_path)
    info = wait_job(cluster, f"{array}_0", finished, 600, "clean the corpus")
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("kolm-clean-*.out"))
    assert info["JobState"] == "COMPLETED", logs[-3000:]
    assert wait_job(cluster, f"{array}_1", finished, 60, "finish")["JobState"] == "COMPLETED", logs[-3000:]
    assert tree(out) == tree(cleaned[0])


@pytest.mark.slurm
@pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster needs root (tools/local-slurm.sh)")
def test_pipeline_cleans_first_and_feeds_the_cleaned_corpus_on(tmp_path, corpus):
    from helpers.dist import write_recipe
    from helpers.slurm_cluster import REPO, job, start_cluster

    cluster = {**start_cluster(), "KOLM_SBATCH_CPU": "--cpus-per-task=1 --mem=1G",
               "KOLM_SBATCH_TRAIN": "--gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=1"}
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "unused", tmp_path / "unused", tmp_path / "run")
    # Held (SBATCH_HOLD) so that nothing runs: this checks the chain; the array job itself is tested above.
    proc = subprocess.run([str(REPO / "slurm/pipeline.sh"), "--recipe", str(recipe), "--input", *map(str, corpus),
                           "--clean", "clean", "--clean-tasks", "2", "--tokenizer", "tok", "--vocab-size", "600",
                           "--shards", "shards", "--out", "model"], env={**cluster, "SBATCH_HOLD": "1"},
                          cwd=tmp_path, capture_output=True, text=True)
    jobs = {line.split(":")[0]: line.split()[2] for line in proc.stdout.splitlines() if " job " in line}
    try:
        assert proc.returncode == 0, proc.stderr
        assert list(jobs)[:3] == ["clean", "tokenizer", "shard"], proc.stdout
        clean_job, tok_job = job(cluster, jobs["clean"]), job(cluster, jobs["tokenizer"])
        assert "slurm/clean.sbatch" in clean_job["Command"]
        # One line per array task (Slurm may keep the pending array as one record "0-1" or split it).
        tasks = subprocess.run(["squeue", "-h", "-r", "-j", jobs["clean"], "-o", "%K"], env=cluster,
                               capture_output=True, text=True).stdout.split()
        assert sorted(tasks) == ["0", "1"], tasks
        assert f"afterok:{jobs['clean']}" in tok_job["Dependency"]
        # `scontrol -o` splits Command on spaces: the tokenizer reads the cleaned directory, not the corpus
        tok_command = subprocess.run(["scontrol", "show", "job", jobs["tokenizer"]], env=cluster, capture_output=True,
                                     text=True).stdout
        assert "tokenizer.sbatch --input clean --vocab-size" in tok_command
    finally:
        subprocess.run(["scancel", *jobs.values()], env=cluster, capture_output=True)
