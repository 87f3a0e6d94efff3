"""Shared fixtures: real Korean text from the bundled corpus, tokenizers trained on it, its shards,
and one finished 2-rank training run; plus the rule that every test names its tier.

Helpers (functions, not fixtures) live in tests/helpers/.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers.dist import train_to_end

from kolm.data.corpus import bundled_corpus_files
from kolm.data.tokenizer import train_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


def _hermetic_environment() -> Path:
    """Give the suite (and every process it starts) caches and a home of its own, so that it never
    reads or writes the user's: a run beside it, or a second suite, cannot disturb it or be disturbed.

    DeepSpeed's ops build once into the checkout's .test-cache/ (kolm's flock guards concurrent
    suites); everything else lives in a temporary directory removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="kolm-tests-"))
    cache = root / "cache"
    os.environ.update(
        HOME=str(root / "home"), XDG_CACHE_HOME=str(cache), HF_HOME=str(cache / "huggingface"),
        HF_HUB_OFFLINE="1", MPLCONFIGDIR=str(cache / "matplotlib"), TRITON_CACHE_DIR=str(cache / "triton"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), WANDB_DIR=str(root / "wandb"),
        WANDB_CACHE_DIR=str(cache / "wandb"), WANDB_CONFIG_DIR=str(root / "wandb-config"),
        TORCH_EXTENSIONS_DIR=str(REPO / ".test-cache" / "torch_extensions"),
    )
    (root / "home").mkdir()
    return root


HERMETIC_ROOT = _hermetic_environment()


def pytest_unconfigure(config):
    shutil.rmtree(HERMETIC_ROOT, ignore_errors=True)

# Every test carries exactly one of these (registered in pyproject.toml); `make check` runs the
# first two, `make test` all of them.
TIERS = ("unit", "cli", "dist", "slurm", "soak")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Refuse to run a suite in which a test has no tier marker, or more than one (checked
    before -m and -k deselect anything, so a forgotten marker cannot hide)."""
    wrong = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError(
            f"every test needs exactly one tier marker ({', '.join(TIERS)}): a module-level "
            "`pytestmark = pytest.mark.<tier>` or `@pytest.mark.<tier>` on the test; see tests/conftest.py.\n"
            + "\n".join(wrong))


@pytest.fixture(scope="session")
def korean_lines() -> list[str]:
    """Non-empty lines of the bundled Korean corpus (constitution and bills), in order."""
    lines = []
    for path in bundled_corpus_files():
        with open(path, encoding="utf-8") as f:
            lines.extend(line.rstrip("\n") for line in f if line.strip())
    return lines


@pytest.fixture(scope="session")
def korean_corpus(tmp_path_factory, korean_lines) -> Path:
    """The bundled corpus as one .txt file (one document per line)."""
    path = tmp_path_factory.mktemp("corpus") / "ko.txt"
    path.write_text("\n".join(korean_lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 2,000-token byte-level BPE trained on the bundled corpus."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(bundled_corpus_files(), out, vocab_size=2000, progress=False)
    return out


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> Path:
    """A 1,000-token BPE on the same corpus: a tokenizer that does not match ``tokenizer_dir`` (or
    ``shards``). Read-only: a test must not write into it."""
    out = tmp_path_factory.mktemp("other-tok") / "tokenizer"
    train_tokenizer(bundled_corpus_files(), out, vocab_size=1000, progress=False)
    return out


@pytest.fixture(scope="session")
def shards(tmp_path_factory, korean_corpus, tokenizer_dir) -> Path:
    """The bundled corpus sharded with 5% held out for validation (enough to evaluate)."""
    from kolm.data.shard import ShardOptions, run_shard

    out = tmp_path_factory.mktemp("shards") / "shards"
    run_shard([str(korean_corpus)], str(tokenizer_dir), out, ShardOptions(valid_fraction=0.05), workers=1,
              progress=False)
    return out


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, shards, tokenizer_dir) -> tuple[Path, Path]:
    """(run dir, recipe) of an uninterrupted 12-step ZeRO-2 run on 2 ranks with the TINY settings of
    helpers/dist.py: checkpoints at steps 4, 8 and 12, evaluations at 6 and 12. The baseline of the
    resume and fault tests. Shared: a test that changes anything copies it first (shutil.copytree)."""
    root = tmp_path_factory.mktemp("reference")
    recipe = train_to_end(root, shards, tokenizer_dir)
    return root / "run", recipe


@pytest.fixture(scope="session")
def second_shards(tmp_path_factory, tokenizer_dir) -> Path:
    """A second, smaller source with the same tokenizer: the constitution alone, 10% held out."""
    from kolm.data.shard import ShardOptions, run_shard

    constitution = [f for f in bundled_corpus_files() if f.endswith("constitution.txt")]
    out = tmp_path_factory.mktemp("second-shards") / "constitution"
    run_shard(constitution, str(tokenizer_dir), out, ShardOptions(valid_fraction=0.1), workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def base_tokenizer(tmp_path_factory) -> Path:
    """A Phi-like English byte-level BPE (1,000 BPE entries ending in <|endoftext|>, then whitespace
    added tokens; see helpers/phi_source.py): the tokenizer of a model to continue. Read-only."""
    from helpers.phi_source import make_base_tokenizer

    return make_base_tokenizer(tmp_path_factory.mktemp("phi-source") / "tokenizer")


@pytest.fixture(scope="session")
def base_phi(tmp_path_factory, base_tokenizer) -> Path:
    """A transformers-made PhiForCausalLM over ``base_tokenizer`` (helpers/base_model.py): the model a
    continued-pretraining run starts from. Read-only."""
    from helpers.base_model import make_base_model

    return make_base_model(base_tokenizer, tmp_path_factory.mktemp("phi-source") / "model")


@pytest.fixture(scope="session")
def extended_tokenizer(tmp_path_factory, base_tokenizer, korean_corpus) -> Path:
    """``base_tokenizer`` extended with 300 Korean tokens learned from the bundled corpus. Read-only."""
    from kolm.data.tokenizer_extend import extend_tokenizer

    out = tmp_path_factory.mktemp("extended") / "tokenizer"
    extend_tokenizer(str(base_tokenizer), [str(korean_corpus)], 300, str(out), progress=False)
    return out


@pytest.fixture(scope="session")
def grown(tmp_path_factory, base_phi, extended_tokenizer) -> Path:
    """``base_phi`` grown by `kolm model expand` for ``extended_tokenizer``. Read-only."""
    from kolm.model.expand import expand_model

    out = tmp_path_factory.mktemp("grown") / "model"
    expand_model(str(base_phi), str(extended_tokenizer), str(out))
    return out


@pytest.fixture(scope="session")
def korean_shards(tmp_path_factory, korean_corpus, extended_tokenizer) -> Path:
    """The bundled corpus sharded with ``extended_tokenizer``, 5% held out."""
    from kolm.data.shard import ShardOptions, run_shard

    out = tmp_path_factory.mktemp("ko-shards") / "shards"
    run_shard([str(korean_corpus)], str(extended_tokenizer), out, ShardOptions(valid_fraction=0.05), workers=1,
              progress=False)
    return out
