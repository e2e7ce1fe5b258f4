"""core/config.py + launchers/experiment.py: YAML loading, dotted overrides, error messages, validation (every
section's and the task's checks), dump round trip, derived numbers, the task registry."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from core.config import (
    ConfigError,
    apply_overrides,
    config_to_dict,
    derived,
    epochs_to_steps,
    resolve_run_dir,
    save_config,
)
from launchers.experiment import ExperimentConfig, config_from_dict, load_config, validate
from models.dit_config import TimestepPhase

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith(("extract_", "pipeline_")))
XL = ROOT / "configs" / "lightningdit_xl.yaml"
XL64 = ROOT / "configs" / "lightningdit_xl_64ep.yaml"
TINY = ROOT / "configs" / "tiny_dit.yaml"
IMAGENET = 1_281_167


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


# --------------------------------------------------------------------------------------------- shipped configs


def test_all_three_configs_exist():
    assert {p.name for p in CONFIGS} >= {"lightningdit_xl.yaml", "lightningdit_xl_64ep.yaml", "tiny_dit.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    validate(cfg, world_size=1)
    d = config_to_dict(cfg)
    assert isinstance(d["optimizer"]["betas"], list)  # tuples become lists
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again == cfg
    assert config_to_dict(again) == d
    assert config_from_dict(d) == cfg


def test_real_model_registry_knows_official_names():
    validate(load_config(XL, check=False))  # the registry of models/lightningdit.py


def test_official_800ep_recipe_values():
    cfg = load_config(XL, world_size=8)
    m = cfg.model
    assert (m.type, m.in_channels, m.input_size, m.num_classes, m.class_dropout_prob) == (
        "LightningDiT-XL/1",
        32,
        16,
        1000,
        0.1,
    )
    assert (m.use_swiglu, m.use_rope, m.use_rmsnorm, m.use_qknorm, m.learn_sigma, m.wo_shift) == (
        True,
        True,
        True,
        False,
        False,
        False,
    )
    o = cfg.optimizer
    assert (o.name, o.lr, o.betas, o.weight_decay, o.eps) == ("adamw", 2e-4, (0.9, 0.95), 0.0, 1e-8)
    assert cfg.lr_schedule.kind == "constant"
    t = cfg.train
    assert (t.global_batch_size, t.ema_decay, t.grad_clip, t.epochs, t.max_steps) == (1024, 0.9999, None, 800, None)
    assert cfg.transport.use_cosine_loss is True
    assert cfg.transport.timestep_sampling == [TimestepPhase("lognorm", 480.0, 0.0, 1.0), TimestepPhase("uniform")]
    assert cfg.engine.precision == "bf16-autocast"  # the official numerics (fp32 parameters, bf16 autocast)
    assert cfg.checkpoint.every_steps == 20000
    s = cfg.sampling
    assert (s.method, s.num_steps, s.cfg_scale, s.cfg_interval_start, s.timestep_shift, s.guidance_mode) == (
        "euler",
        250,
        6.7,
        0.125,
        0.3,
        "official",
    )
    assert cfg.data.path == "data/imagenet256_vavae_f16d32" and cfg.data.latent_norm and cfg.data.random_flip
    d = derived(cfg, world_size=8, dataset_size=IMAGENET)
    assert (d.micro_batch_size, d.grad_accum_steps, d.steps_per_epoch, d.total_steps) == (128, 1, 1251, 1_000_800)
    assert 480 * d.steps_per_epoch == 600_480  # the "600k iterations" lognorm -> uniform switch


def test_official_64ep_recipe_values():
    cfg = load_config(XL64)
    assert cfg.transport.timestep_sampling == [TimestepPhase("lognorm", None, 0.0, 1.0)]
    assert (cfg.sampling.cfg_scale, cfg.sampling.cfg_interval_start, cfg.sampling.timestep_shift) == (10.0, 0.10, 0.3)
    assert (cfg.optimizer.lr, cfg.optimizer.betas, cfg.train.global_batch_size) == (2e-4, (0.9, 0.95), 1024)
    d = derived(cfg, world_size=8, dataset_size=IMAGENET)
    assert d.total_steps == 80_000 and round(d.total_epochs, 1) == 63.9


def test_tiny_config_values():
    cfg = load_config(TINY)
    m = cfg.model
    assert (m.type, m.hidden_size, m.depth, m.num_heads, m.patch_size, m.in_channels, m.input_size, m.num_classes) == (
        "custom",
        64,
        2,
        4,
        2,
        3,
        16,
        10,
    )
    assert cfg.engine.precision == "fp32" and cfg.train.global_batch_size == 16 and cfg.train.epochs == 4
    assert [p.kind for p in cfg.transport.timestep_sampling] == ["lognorm", "uniform"]
    assert cfg.transport.timestep_sampling[0].until_epoch == 2
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep_last) == (4, 3)
    assert (cfg.train.log_every, cfg.train.progress_bar, cfg.wandb.mode, cfg.data.num_workers) == (
        1,
        False,
        "offline",
        0,
    )
    validate(cfg, world_size=2)
    validate(cfg, world_size=4)


# ---------------------------------------------------------------------------------------------------- overrides


def test_overrides_nested_list_null_and_list_of_dicts():
    cfg = load_config(
        XL,
        [
            "train.global_batch_size=256",
            "optimizer.betas=[0.9,0.999]",
            "checkpoint.every_steps=null",
            "optimizer.lr=1e-4",  # YAML 1.2 float without a dot
            "transport.timestep_sampling=[{kind: lognorm, until_epoch: 10}, {kind: uniform}]",
            "wandb.tags=[a, b]",
            "model.init_from=/ckpt/x.pt",
        ],
    )
    assert cfg.train.global_batch_size == 256
    assert cfg.optimizer.betas == (0.9, 0.999) and isinstance(cfg.optimizer.betas, tuple)
    assert cfg.checkpoint.every_steps is None
    assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.transport.timestep_sampling == [TimestepPhase("lognorm", 10.0), TimestepPhase("uniform")]
    assert cfg.wandb.tags == ["a", "b"]
    assert cfg.model.init_from == "/ckpt/x.pt"


def test_override_list_item_section_merge_and_string_fields():
    cfg = load_config(
        XL,
        [
            "transport.timestep_sampling.0.until_epoch=400",
            "model={depth: 4, hidden_size: 128}",
            "name=2024",
            "data.path=",
            "train.grad_clip=1",
        ],
    )
    assert cfg.transport.timestep_sampling[0].until_epoch == 400.0
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.type) == (4, 128, "LightningDiT-XL/1")
    assert cfg.name == "2024" and cfg.data.path == ""
    assert cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)  # int accepted for float
    cfg = load_config(XL, ["transport.timestep_sampling.0={until_epoch: 3, std: 2}"])  # list item merged
    assert cfg.transport.timestep_sampling[0] == TimestepPhase("lognorm", 3.0, 0.0, 2.0)


def test_override_later_wins_and_apply_overrides_on_object():
    cfg = apply_overrides(ExperimentConfig(), ["seed=1", "seed=2"])
    assert cfg.seed == 2


def test_override_unknown_key_suggests():
    msg = error_of(load_config, XL, ["train.global_batchsize=256"])
    assert msg == "command line: train.global_batchsize: unknown key; did you mean 'global_batch_size'?"


def test_override_malformed_without_equals():
    msg = error_of(load_config, XL, ["train.global_batch_size"])
    assert msg.startswith("command line: 'train.global_batch_size': malformed override") and "'='" in msg


def test_override_bad_type_and_index():
    msg = error_of(load_config, XL, ["train.global_batch_size=abc"])
    assert msg == "command line: train.global_batch_size: expected int, got str 'abc'"
    msg = error_of(load_config, XL, ["transport.timestep_sampling.5.until_epoch=1"])
    assert "transport.timestep_sampling[5]" in msg and "out of range" in msg
    msg = error_of(load_config, XL, ["train.ema_decay.x=1"])
    assert "command line: train.ema_decay.x:" in msg and "not a section" in msg


def test_override_yaml_error_names_command_line():
    msg = error_of(load_config, XL, ["optimizer.betas=[0.9, 0.95"])
    assert msg.startswith("command line: optimizer.betas: YAML syntax error")


def test_override_value_error_attributed_to_command_line():
    msg = error_of(load_config, XL, ["optimizer.lr=0"])
    assert msg == "command line: optimizer.lr: must be > 0, got 0.0"


# ----------------------------------------------------------------------------------------------- file errors


def test_file_unknown_key_with_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  global_batchsize: 256\n")
    msg = error_of(load_config, path)
    assert msg == f"{path}: train.global_batchsize: unknown key; did you mean 'global_batch_size'?"


def test_file_unknown_section_with_suggestion(tmp_path):
    msg = error_of(load_config, write(tmp_path, "optimiser:\n  lr: 1.0e-4\n"))
    assert "exp.yaml: optimiser: unknown key; did you mean 'optimizer'?" in msg


def test_file_unknown_key_in_list_item(tmp_path):
    path = write(
        tmp_path, "transport:\n  timestep_sampling:\n    - {kind: lognorm, until_epohc: 3}\n    - {kind: uniform}\n"
    )
    msg = error_of(load_config, path)
    assert "transport.timestep_sampling[0].until_epohc: unknown key; did you mean 'until_epoch'?" in msg


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ("train: {global_batch_size: abc}", "train.global_batch_size", "expected int, got str 'abc'"),
        ("train: {global_batch_size: true}", "train.global_batch_size", "expected int, got bool True"),
        ("train: {global_batch_size: 2.5}", "train.global_batch_size", "expected int, got float 2.5"),
        ("optimizer: {lr: '2e-4'}", "optimizer.lr", "expected float, got str '2e-4'"),
        ("optimizer: {lr: true}", "optimizer.lr", "expected float, got bool True"),
        ("optimizer: {betas: [0.9]}", "optimizer.betas", "expected a list of 2 (float, float), got 1 items [0.9]"),
        ("optimizer: {betas: [0.9, x]}", "optimizer.betas[1]", "expected float, got str 'x'"),
        ("train: {progress_bar: 1}", "train.progress_bar", "expected bool, got int 1"),
        ("train: {epochs: null, max_steps: '10'}", "train.max_steps", "expected int or null, got str '10'"),
        ("model: 3", "model", "expected a mapping (ModelConfig), got int 3"),
        ("name: null", "name", "expected str, got null"),
        (
            "transport: {timestep_sampling: {kind: uniform}}",
            "transport.timestep_sampling",
            "expected a list of a mapping (TimestepPhase), got dict",
        ),
    ],
)
def test_file_wrong_types(tmp_path, text, key, problem):
    path = write(tmp_path, text + "\n")
    msg = error_of(load_config, path)
    assert msg.startswith(f"{path}: {key}: {problem}"), msg


def test_int_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "optimizer: {lr: 1}\ntrain: {epochs: 3}\n"))
    assert cfg.optimizer.lr == 1.0 and type(cfg.optimizer.lr) is float and type(cfg.train.epochs) is float


def test_literal_outside_choices_lists_them(tmp_path):
    msg = error_of(load_config, write(tmp_path, "engine:\n  precision: fp16\n"))
    assert msg.endswith("engine.precision: 'fp16' is not one of: 'bf16', 'bf16-autocast', 'fp32'")
    msg = error_of(load_config, XL, ["transport.timestep_sampling=[{kind: beta}]"])
    assert msg == ("command line: transport.timestep_sampling[0].kind: 'beta' is not one of: 'lognorm', 'uniform'")


def test_yaml_syntax_error_has_line_number(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n  global_batch_size: 16\n  epochs: [1, 2\nseed: 1\n")
    msg = error_of(load_config, path)
    assert msg.startswith(f"{path}: YAML syntax error at line ")
    line = int(msg.split("at line ")[1].split(",")[0])
    assert 4 <= line <= 5


def test_yaml_duplicate_key_rejected(tmp_path):
    msg = error_of(load_config, write(tmp_path, "optimizer:\n  lr: 1.0e-4\n  lr: 2.0e-4\n"))
    assert "exp.yaml: YAML syntax error at line 3" in msg and "duplicate key 'lr'" in msg


def test_missing_file():
    msg = error_of(load_config, "/nonexistent/dir/cfg.yaml")
    assert msg == "/nonexistent/dir/cfg.yaml: file not found"


def test_top_level_must_be_mapping(tmp_path):
    msg = error_of(load_config, write(tmp_path, "- a\n- b\n"))
    assert "exp.yaml: the top level must be a mapping" in msg


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == ExperimentConfig()


def test_scientific_notation_floats_in_file(tmp_path):
    cfg = load_config(write(tmp_path, "optimizer: {lr: 3e-4, eps: 1E-6}\n"))
    assert (cfg.optimizer.lr, cfg.optimizer.eps) == (3e-4, 1e-6)


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["train.global_batch_size=0"], "train.global_batch_size", "must be > 0"),
        (["train.micro_batch_size=-1"], "train.micro_batch_size", "must be > 0"),
        (["optimizer.lr=0"], "optimizer.lr", "must be > 0"),
        (["train.ema_decay=1.0"], "train.ema_decay", "must be in [0, 1)"),
        (["train.ema_decay=-0.1"], "train.ema_decay", "must be in [0, 1)"),
        (["optimizer.betas=[0.9, 1.0]"], "optimizer.betas[1]", "must be in [0, 1)"),
        (
            ["train.epochs=null", "train.max_steps=null"],
            "train.epochs",
            "at least one of train.epochs and train.max_steps",
        ),
        (
            ["transport.timestep_sampling=[{kind: lognorm}, {kind: uniform}]"],
            "transport.timestep_sampling[0].until_epoch",
            "needs until_epoch",
        ),
        (
            [
                "transport.timestep_sampling=[{kind: lognorm, until_epoch: 5}, {kind: lognorm, until_epoch: 5}, "
                "{kind: uniform}]"
            ],
            "transport.timestep_sampling[1].until_epoch",
            "strictly increasing",
        ),
        (
            ["transport.timestep_sampling=[{kind: lognorm, until_epoch: 5}, {kind: uniform, until_epoch: 9}]"],
            "transport.timestep_sampling[1].until_epoch",
            "must have until_epoch null",
        ),
        (["transport.timestep_sampling=[]"], "transport.timestep_sampling", "at least one phase"),
        (["model.type=LightningDit-XL/1"], "model.type", "did you mean 'LightningDiT-XL/1'?"),
        (["model.type=custom", "model.num_heads=5"], "model.hidden_size", "not divisible by num_heads 5"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last", "must be > 0"),
    ],
)
def test_value_errors_name_the_key(overrides, key, fragment):
    msg = error_of(load_config, XL, overrides)
    line = next(ln for ln in msg.splitlines() if f": {key}: " in ln)
    assert fragment in line and line.startswith("command line: "), msg


def test_value_error_from_file_names_file(tmp_path):
    path = write(tmp_path, "train: {ema_decay: 1.5}\n")
    assert error_of(load_config, path) == f"{path}: train.ema_decay: must be in [0, 1), got 1.5"


def test_validate_reports_all_problems_and_can_be_skipped(tmp_path):
    path = write(tmp_path, "optimizer: {lr: 0}\ntrain: {global_batch_size: 0}\n")
    msg = error_of(load_config, path)
    assert "optimizer.lr" in msg and "train.global_batch_size" in msg and len(msg.splitlines()) == 2
    load_config(path, check=False)  # types only


def test_unknown_model_type_lists_registry():
    cfg = ExperimentConfig()
    cfg.model.type = "UNet"
    msg = error_of(validate, cfg)
    assert msg.startswith("config: model.type: unknown model 'UNet'") and "LightningDiT-XL/1" in msg
    assert "custom" in msg


def test_core_imports_no_higher_layer():
    """The config machinery, schedules, task contract and trainer live in core/ and import nothing from models/,
    data/, launchers/ or tools/ (each section is checked by its owner; the experiment assembles them)."""
    code = (
        "import sys, core.config, core.registry, core.schedule, core.task, core.trainer; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'models', 'data', 'launchers', 'tools'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_task_registry_matches_schema_and_names_unknown_tasks():
    from models.tasks import TASKS, build_task

    assert TASKS.names() == list(typing.get_args(typing.get_type_hints(ExperimentConfig)["task"]))
    with pytest.raises(ValueError, match=r"^task: unknown task 'gan'; known: 'dit', 'vavae'$"):
        build_task(ExperimentConfig(task="gan"), None)
    cfg = ExperimentConfig(task="vavae")  # the task's own checks come from its registry entry
    cfg.vavae.model.ch = 48
    assert "config: vavae.model.ch: must be a multiple of 32 (GroupNorm(32)), got 48" in error_of(validate, cfg)


def test_world_size_divisibility_names_the_numbers():
    cfg = load_config(XL)
    validate(cfg, world_size=8)
    msg = error_of(validate, cfg, world_size=3)
    assert "train.global_batch_size" in msg and "1024" in msg and "world size 3" in msg
    cfg.train.micro_batch_size = 48
    msg = error_of(validate, cfg, world_size=8)
    assert "train.micro_batch_size" in msg and "1024" in msg and "8" in msg and "48" in msg and "384" in msg
    msg = error_of(load_config, XL, ["train.global_batch_size=1000"], world_size=16)
    assert msg == ("command line: train.global_batch_size: global batch size 1000 is not divisible by world size 16")


def test_hybrid_sharding_keys():
    cfg = load_config(XL, ["engine.sharding=hybrid", "engine.shard_group_size=8", "engine.precision=bf16-autocast"])
    validate(cfg, world_size=64)
    assert (cfg.engine.sharding, cfg.engine.shard_group_size, cfg.engine.precision) == ("hybrid", 8, "bf16-autocast")
    assert error_of(validate, cfg, world_size=4) == (
        "config: engine.shard_group_size: world size 4 is not divisible "
        "by shard_group_size 8 (hybrid sharding replicates whole shard "
        "groups)"
    )
    msg = error_of(load_config, XL, ["engine.sharding=hybrid", "engine.shard_group_size=0"])
    assert msg == "command line: engine.shard_group_size: must be > 0, got 0"
    msg = error_of(load_config, XL, ["engine.sharding=hybrid", "engine.kind=deepspeed"])
    assert msg.startswith(
        "command line: engine.sharding: hybrid sharding (HSDP) needs engine.kind=fsdp2, got 'deepspeed'"
    )
    msg = error_of(load_config, XL, ["engine.shard_group_size=4"])
    assert msg.startswith("command line: engine.shard_group_size: is only used with engine.sharding=hybrid")


# --------------------------------------------------------------------------------------------- helpers


def test_resolve_run_dir():
    cfg = ExperimentConfig(name="abc")
    assert resolve_run_dir(cfg) == Path("runs/abc")
    cfg.run_dir = "/scratch/r1"
    assert resolve_run_dir(cfg) == Path("/scratch/r1")


def test_derived_accumulation_and_lengths():
    cfg = load_config(XL, ["train.micro_batch_size=32"])
    d = derived(cfg, world_size=8, dataset_size=IMAGENET)
    assert (d.micro_batch_size, d.grad_accum_steps, d.steps_per_epoch) == (32, 4, 1251)
    cfg = load_config(XL, ["train.epochs=2.5", "train.max_steps=100000"])
    assert derived(cfg, 4, 10_000).total_steps == 22  # 10000 // 1024 = 9 steps/epoch, floor(22.5)
    assert derived(cfg, 4, 10_000_000).total_steps == 24_412  # 9765 * 2.5 = 24412.5
    cfg = load_config(XL, ["train.max_steps=100"])
    assert derived(cfg, 1, IMAGENET).total_steps == 100  # max_steps wins
    nod = derived(cfg, 2, None)
    assert (nod.micro_batch_size, nod.steps_per_epoch, nod.total_steps) == (512, None, None)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        derived(cfg, 1, 1000)
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        derived(cfg, 3, IMAGENET)


def test_epochs_to_steps_is_exact_for_decimals():
    assert epochs_to_steps(0.29, 100) == 29
    assert epochs_to_steps(800, 1251) == 1_000_800
    assert epochs_to_steps(63.9, 1251) == 79_938


def test_save_config_writes_yaml_with_lists(tmp_path):
    out = save_config(load_config(TINY), tmp_path / "config.yaml")
    text = out.read_text()
    assert "betas:\n  - 0.9\n  - 0.95" in text or "betas:\n- 0.9\n- 0.95" in text
    assert "!!python" not in text
