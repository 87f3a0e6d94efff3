"""Run config, DeepSpeed config filling, presets and the distributed environment: fast checks
that bad configuration fails before any process group starts, with a message naming the key."""

from __future__ import annotations

import json

import pytest
import torch

from kolm.errors import KolmError
from kolm.model.flops import flops_per_token, parameter_count
from kolm.model.presets import PRESETS, build_config, get_shape, padded_vocab, phi_config_dict
from kolm.train import distenv, dsconfig
from kolm.train.config import RunConfig, load_config

pytestmark = pytest.mark.unit
BASE = ["data=/d", "tokenizer=/t", "run_dir=/r"]


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: phi-tiny\nseq_len: 128\nlr: 1.0e-3\n")
    cfg = load_config(recipe, [*BASE, "seq_len=256", "model_overrides.num_hidden_layers=3", "tensorboard=false"])
    assert (cfg.model, cfg.seq_len, cfg.lr, cfg.tensorboard) == ("phi-tiny", 256, 1e-3, False)
    assert cfg.model_overrides == {"num_hidden_layers": 3}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learning_rate=1e-3"], "unknown config key `learning_rate`"),
        (["micro_bach=4"], "did you mean `micro_batch`"),
        (["seq_len=long"], "`seq_len` in the command line must be int, got 'long'"),
        (["zero_stage=4"], "`zero_stage` must be 0 .*, 1, 2 or 3, got 4"),
        (["precision=fp16"], "`precision` must be bf16, fp32 or fp8"),
        (["global_batch=10", "micro_batch=4"], "global_batch 10 is not a multiple of micro_batch 4"),
        (["min_lr=1.0", "lr=0.1"], "`min_lr` 1.0 must be in"),
        (["seq_len"], "is not key=value"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(KolmError, match=message.replace("(", r"\(").replace("`", "`")):
        load_config(None, [*BASE, *overrides])


def test_missing_paths_and_recipe_errors(tmp_path):
    with pytest.raises(KolmError, match="`data` is required"):
        load_config(None, ["tokenizer=/t", "run_dir=/r"])
    with pytest.raises(KolmError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml", BASE)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(KolmError, match="not valid YAML"):
        load_config(bad, BASE)
    typo = tmp_path / "typo.yaml"
    typo.write_text("warmup: 10\n")
    with pytest.raises(KolmError, match=f"unknown config key `warmup` in {typo}"):
        load_config(typo, BASE)


def test_ds_config_is_filled_from_the_run_config():
    cfg = RunConfig(data="d", tokenizer="t", run_dir="r", zero_stage=3, global_batch=32, micro_batch=2)
    ds = dsconfig.build(cfg, dp_world=4, grad_accum=4, on_cpu=True)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == cfg.lr and "scheduler" not in ds  # kolm sets the lr (lr_schedule)
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] > 0  # the template's own settings survive



def test_cpu_runs_get_pytorchs_fused_adamw_and_gpu_runs_deepspeeds():
    cfg = RunConfig(data="d", tokenizer="t", run_dir="r")
    params = dict(dsconfig.build(cfg, dp_world=2, grad_accum=1, on_cpu=True)["optimizer"]["params"])
    assert params.pop("torch_adam") is True
    # DeepSpeed hands the remaining params to torch.optim.AdamW: they must make the fused kernel
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))], **params)
    assert opt.defaults["fused"] is True and opt.defaults["weight_decay"] == cfg.weight_decay
    gpu = dsconfig.build(cfg, dp_world=2, grad_accum=1, on_cpu=False)["optimizer"]["params"]
    assert "torch_adam" not in gpu and "fused" not in gpu

def test_contradicting_ds_config_is_refused(tmp_path):
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    cfg = RunConfig(data="d", tokenizer="t", run_dir="r", micro_batch=4, deepspeed_config=str(user))
    with pytest.raises(KolmError, match="sets train_micro_batch_size_per_gpu = 8 .* gives 4 \\(from micro_batch\\)"):
        dsconfig.build(cfg, 1, 64, True)
    stage = RunConfig(data="d", tokenizer="t", run_dir="r", zero_stage=1, deepspeed_config="zero3.json")
    with pytest.raises(KolmError, match="zero_optimization.stage = 3"):
        dsconfig.build(stage, 1, 64, True)
    agreeing = RunConfig(data="d", tokenizer="t", run_dir="r", micro_batch=8, deepspeed_config=str(user))
    assert dsconfig.build(agreeing, 1, 32, True)["train_micro_batch_size_per_gpu"] == 8


@pytest.mark.parametrize("name", ["phi-tiny", "phi-10m", "phi-40m"])
def test_parameter_count_matches_the_real_model(name):
    from transformers import PhiForCausalLM

    shape = get_shape(name)
    model = PhiForCausalLM(build_config(shape, 1024, 0, 0, shape.max_position_embeddings))
    assert parameter_count(shape, 1024) == sum(p.numel() for p in model.parameters())


def test_phi_presets_have_the_published_shapes():
    phi15 = PRESETS["phi-1.5"]
    assert (phi15.hidden_size, phi15.num_hidden_layers, phi15.num_attention_heads, phi15.intermediate_size) == (
        2048, 24, 32, 8192)
    assert phi15.partial_rotary_factor == 0.5 and phi15.hidden_act == "gelu_new"
    assert 1.3e9 < parameter_count(phi15, 51200) < 1.45e9
    assert 2.7e9 < parameter_count(PRESETS["phi-2"], 51200) < 2.85e9
    n = parameter_count(phi15, 51200) - 51200 * 2048
    assert flops_per_token(phi15, 51200, 2048) == 6 * n + 12 * 24 * 2048 * 2048
    assert padded_vocab(50295) == 50304 and padded_vocab(8000) == 8000


def test_config_dict_writes_every_phi_field():
    from transformers import PhiConfig

    d = phi_config_dict(PRESETS["phi-1.5"], 51200, 7, 7, 2048)
    library_fields = set(PhiConfig().to_dict()) - {
        "transformers_version", "dtype", "output_attentions", "output_hidden_states", "return_dict",
        "is_encoder_decoder", "problem_type", "chunk_size_feed_forward", "id2label", "label2id", "_name_or_path"}
    assert library_fields <= set(d)
    assert (d["bos_token_id"], d["eos_token_id"], d["tie_word_embeddings"]) == (7, 7, False)


def test_unknown_preset_and_bad_override():
    with pytest.raises(KolmError, match="unknown model preset 'phi-3'"):
        get_shape("phi-3")
    with pytest.raises(KolmError, match="unknown model field"):
        get_shape("phi-tiny", hidden=3)
    with pytest.raises(KolmError, match="not divisible by num_attention_heads"):
        get_shape("phi-tiny", hidden_size=66)


def test_nodelist_expansion_and_slurm_environment(monkeypatch):
    assert distenv.expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert distenv.expand_nodelist("n[8-10]-ib") == ["n8-ib", "n9-ib", "n10-ib"]
    assert distenv.expand_nodelist("solo") == ["solo"]
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[3-4]")
    env = distenv.detect()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 16, 1, "node3")
    assert env.master_port == distenv.slurm_master_port("123456") and env.launcher == "slurm"
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    with pytest.raises(KolmError, match="SLURM_JOB_NODELIST is not set"):
        distenv.detect()


def test_torchrun_environment_requires_master(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(KolmError, match="MASTER_ADDR is not"):
        distenv.detect()
    monkeypatch.setenv("MASTER_ADDR", "h")
    monkeypatch.setenv("MASTER_PORT", "x")
    with pytest.raises(KolmError, match="MASTER_PORT='x' is not an integer"):
        distenv.detect()


def test_token_stats_scores_prediction_i_against_token_i_plus_1():
    from kolm.model.loss import EvalTotals, token_stats

    vocab = 5
    window = torch.tensor([[1, 2, 3, 4]])
    logits = torch.full((1, 3, vocab), -10.0)
    logits[0, 0, 2] = logits[0, 1, 3] = 10.0  # right for targets 2 and 3
    logits[0, 2, 0] = 10.0  # wrong: target is 4
    loss_sum, correct, n = token_stats(logits, window[:, 1:])
    assert (int(correct), n) == (2, 3)
    totals = EvalTotals()
    totals.add(loss_sum, correct, n)
    summary = totals.summary()
    assert summary["eval_accuracy"] == pytest.approx(2 / 3)
    assert summary["eval_loss"] == pytest.approx(float(loss_sum) / 3)


@pytest.mark.parametrize("nproc", range(1, 9))
def test_demo_batch_layout_fits_any_process_count(nproc, tmp_path):
    from kolm.cli.demo import demo_recipe

    recipe = demo_recipe(tmp_path, steps=300, gpu=True, nproc=nproc)
    cfg = RunConfig(**recipe)
    cfg.validate()
    assert cfg.global_batch >= 16 and cfg.global_batch % (cfg.micro_batch * nproc) == 0


def test_zero_stage_0_builds_the_plain_data_parallel_config():
    cfg = load_config(None, [*BASE, "zero_stage=0"])
    ds = dsconfig.build(cfg, dp_world=1, grad_accum=cfg.global_batch // cfg.micro_batch, on_cpu=True)
    assert ds["zero_optimization"] == {"stage": 0} and ds["gradient_clipping"] == cfg.grad_clip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adam_beta1=1.5", r"`adam_beta1` must be in \[0, 1\), got 1.5"),
        ("adam_beta2=1", r"`adam_beta2` must be in \[0, 1\), got 1.0"),
        ("adam_eps=-1", "`adam_eps` must be > 0, got -1.0"),
        ("adam_eps=0", "`adam_eps` must be > 0, got 0.0"),
        ("weight_decay=-3", "`weight_decay` must be >= 0, got -3.0"),
        ("grad_clip=-1", r"`grad_clip` must be >= 0 \(0: no clipping\), got -1.0"),
        ("seed=-1", r"`seed` must be in \[0, 4294967295\], got -1"),
        ("eval_samples=-5", r"`eval_samples` must be >= 0 \(0: the whole validation split\), got -5"),
        ("lr=-1e-4", "`lr` must be >= 0 .*, got -0.0001"),
        ("lr=nan", "`lr` must be >= 0 .*, got nan"),
        ("epochs=.inf", "`epochs` must be > 0, got inf"),
        ("warmup_steps=-1", "`warmup_steps` must be >= 0, got -1"),
        ("train_steps=-2", "`train_steps` must be >= 0 .*, got -2"),
        ("hang_timeout=-1", "`hang_timeout` must be >= 0 .*, got -1.0"),
        ("keep_checkpoints=0", "`keep_checkpoints` must be >= 1, got 0"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_key(override, message):
    with pytest.raises(KolmError, match=message) as caught:
        load_config(None, [*BASE, override])
    assert caught.value.exit_code == 2


def test_every_numeric_key_has_a_bound_its_default_keeps():
    from dataclasses import fields

    from kolm.train.config import BOUNDS

    numeric = {f.name for f in fields(RunConfig) if f.type in ("int", "float")}
    assert numeric - {"zero_stage"} == set(BOUNDS)
    defaults = RunConfig()
    assert all(bound.holds(getattr(defaults, name)) for name, bound in BOUNDS.items())
    assert load_config(None, [*BASE, "grad_clip=0", "eval_samples=0", "seed=0"]).grad_clip == 0  # 0: off


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model_overrides.hidden_size=abc", "`model_overrides.hidden_size` must be a positive integer, got 'abc'"),
        ("model_overrides.num_attention_heads=0", "`model_overrides.num_attention_heads` must be a positive integer"),
        ("model_overrides.num_hidden_layers=0", "`model_overrides.num_hidden_layers` must be a positive integer"),
        ("model_overrides.intermediate_size=2.5", "`model_overrides.intermediate_size` must be a positive integer"),
        ("model_overrides.partial_rotary_factor=1.5", r"`model_overrides.partial_rotary_factor` must be a number in"),
        ("model_overrides.layer_norm_eps=-1", "`model_overrides.layer_norm_eps` must be a positive number"),
        ("model_overrides.heads=4", "unknown model field.* heads in model_overrides"),
    ],
)
def test_bad_model_overrides_are_refused_naming_the_field(override, message):
    with pytest.raises(KolmError, match=message):
        load_config(None, [*BASE, override])


def test_model_overrides_are_typed_and_checked_against_the_shape():
    cfg = load_config(None, [*BASE, "model_overrides.layer_norm_eps=1e-6", "model_overrides.partial_rotary_factor=1"])
    assert cfg.model_overrides == {"layer_norm_eps": 1e-6, "partial_rotary_factor": 1.0}
    assert get_shape("phi-tiny", **cfg.model_overrides).layer_norm_eps == 1e-6
    with pytest.raises(KolmError, match="gives 5 rotary dimensions; rotary embeddings need an even number"):
        get_shape("phi-tiny", partial_rotary_factor=0.3125)  # head_dim 16
    with pytest.raises(KolmError, match="gives 0 rotary dimensions"):
        get_shape("phi-tiny", partial_rotary_factor=0.05)
    with pytest.raises(KolmError, match="hidden_act 'gelu_newer' is not an activation"):
        get_shape("phi-tiny", hidden_act="gelu_newer")
    assert all(get_shape(name) == shape for name, shape in PRESETS.items())


def test_text_keys_keep_what_was_written_and_bad_yaml_names_the_key(tmp_path):
    cfg = load_config(None, [*BASE, "wandb_name=0123", "run_dir=@scratch/x", "wandb_project=1e3"])
    assert (cfg.wandb_name, cfg.run_dir, cfg.wandb_project) == ("0123", "@scratch/x", "1e3")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("wandb_name: 0123\nwandb_mode: off\ndata: 007\ntokenizer: /t\nrun_dir: /r\n")
    with pytest.raises(KolmError, match="`wandb_mode` must be online, offline, disabled or empty, got 'off'"):
        load_config(recipe)
    cfg = load_config(recipe, ["wandb_mode=offline", "trainable=[layers]"])
    assert (cfg.wandb_name, cfg.data, cfg.trainable) == ("0123", "007", ["layers"])
    with pytest.raises(KolmError, match="override `lr=@1`: the value of `lr` is not valid YAML .*; give a number"):
        load_config(None, [*BASE, "lr=@1"])
    with pytest.raises(KolmError, match="`model_overrides.hidden_size` is not valid YAML"):
        load_config(None, [*BASE, "model_overrides.hidden_size=[1"])


def _resume_setup(tmp_path, data, tokenizer, *overrides):
    """A config and its setup on ``data``, for the resume checks (a ramp, so run lengths are in ramped steps)."""
    from kolm.train.setup import prepare

    cfg = load_config(None, [f"data={data}", f"tokenizer={tokenizer}", f"run_dir={tmp_path / 'run'}",
                             "model=phi-tiny", "seq_len=64", "global_batch=8", "micro_batch=2",
                             "rampup_batch_size=[4, 2, 40]", "warmup_steps=2", "epochs=2", *overrides])
    return cfg, prepare(cfg)


def test_changed_data_keeps_the_run_length_of_an_epochs_run(tmp_path, shards, second_shards, tokenizer_dir):
    from helpers.marker import write_marker

    from kolm.train.checkpoint import find_resume
    from kolm.train.resume import check_resumable

    old_cfg, old = _resume_setup(tmp_path, shards, tokenizer_dir)
    write_marker(tmp_path / "run", old_cfg, old, step=5)
    ckpt = find_resume(tmp_path / "run" / "checkpoints")
    cfg, setup = _resume_setup(tmp_path, second_shards, tokenizer_dir)
    assert setup.total_steps < old.total_steps  # epochs of the smaller data
    with pytest.raises(KolmError, match="was trained on different data"):
        check_resumable(ckpt, cfg, setup)
    cfg, setup = _resume_setup(tmp_path, second_shards, tokenizer_dir, "ignore_data_fingerprint=true")
    check_resumable(ckpt, cfg, setup)
    assert (setup.total_steps, setup.lr) == (old.total_steps, old.lr)  # the length and the decay it began with
    full = old.lr.total // 8
    cfg, setup = _resume_setup(tmp_path, second_shards, tokenizer_dir, "ignore_data_fingerprint=true",
                               f"train_steps={full + 1}")
    with pytest.raises(KolmError, match=rf"total steps {old.total_steps} vs .*train_steps={full}\)") as caught:
        check_resumable(ckpt, cfg, setup)  # a length asked for explicitly is not overridden
    assert "would override" not in str(caught.value)
    cfg, setup = _resume_setup(tmp_path, shards, tokenizer_dir, "epochs=3")  # same data, another length
    with pytest.raises(KolmError, match=rf"total steps {old.total_steps} vs {setup.total_steps}.*train_steps={full}"):
        check_resumable(ckpt, cfg, setup)
