"""Configs from other tools: Axolotl, LLaMA-Factory, Unsloth's CLI, mlx-lm and TRL files read
as edge-tune settings through one alias table; presets; --exact; the step size. Pure: no
model, no training."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_tune import planner
from edge_tune.config import TrainConfig, build
from edge_tune.config_aliases import ALIASES, PRESETS, flag_aliases, step_size
from edge_tune.errors import DataError, UsageError

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "coming_from"


def _read(name: str, **flags) -> tuple[TrainConfig, list[str]]:
    """The config and what was said, the file named as given (here: relative to CONFIGS)."""
    said: list[str] = []
    cfg = build(CONFIGS / name, say=lambda line: said.append(line.replace(f"{CONFIGS}/", "")),
                **flags)
    return cfg, said


def _settings(cfg: TrainConfig, *names: str) -> dict:
    return {n: getattr(cfg, n) for n in names}


def test_an_axolotl_lora_config():
    cfg, said = _read("axolotl_lora.yml")
    assert _settings(cfg, "model", "data", "format", "rank", "alpha", "lora_dropout", "lr",
                     "batch_size", "grad_accum", "epochs", "seq_len", "val_split", "out",
                     "pack", "train_on", "grad_checkpoint", "warmup_steps", "full") == {
        "model": "NousResearch/Llama-3.2-1B", "data": "teknium/GPT4-LLM-Cleaned",
        "format": "alpaca", "rank": 16, "alpha": 32.0, "lora_dropout": 0.05, "lr": 2e-4,
        "batch_size": 2, "grad_accum": 2, "epochs": 1.0, "seq_len": 2048, "val_split": 0.1,
        "out": "./outputs/lora-out", "pack": True, "train_on": "assistant",
        "grad_checkpoint": True, "warmup_steps": 10, "full": False}
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj"}
    assert "axolotl_lora.yml: lora_r: 16 -> rank 16" in said
    assert "axolotl_lora.yml: micro_batch_size: 2 -> batch_size 2" in said
    assert "axolotl_lora.yml: sequence_len: 2048 -> seq_len 2048" in said
    assert "axolotl_lora.yml: warmup_steps: 10 -> warmup_steps (edge-tune's own key)" in said
    ignored = [line for line in said if line.startswith("warning: ")]
    assert {line.split(": ")[2].split()[0] for line in ignored} == {
        "loss_watchdog_threshold", "loss_watchdog_patience", "evals_per_epoch",
        "saves_per_epoch", "special_tokens"}


def test_a_llama_factory_config():
    cfg, said = _read("llama_factory_lora_sft.yaml")
    assert _settings(cfg, "model", "data", "method", "full", "rank", "alpha", "target_modules",
                     "chat_template", "seq_len", "max_samples", "batch_size", "grad_accum",
                     "lr", "epochs", "precision", "save_every", "report_to", "out") == {
        "model": "meta-llama/Meta-Llama-3-8B-Instruct", "data": ["identity", "alpaca_en_demo"],
        "method": "sft", "full": False, "rank": 8, "alpha": 16.0,  # its default: 2 x rank
        "target_modules": ["all-linear"], "chat_template": "llama3", "seq_len": 2048,
        "max_samples": 1000, "batch_size": 1, "grad_accum": 8, "lr": 1e-4, "epochs": 3.0,
        "precision": "bf16", "save_every": 500, "report_to": "none",
        "out": "saves/llama3-8b/lora/sft"}
    assert "llama_factory_lora_sft.yaml: cutoff_len: 2048 -> seq_len 2048" in said
    assert "llama_factory_lora_sft.yaml: lora_target: all -> target_modules all-linear" in said
    assert any("lora_rank: 8 -> alpha 16" in line for line in said)
    warned = [line for line in said if line.startswith("warning: ")]
    assert warned[0] == ("warning: llama_factory_lora_sft.yaml: "
                         "trust_remote_code ignored: True: no remote code is run")
    assert len(warned) == 1 and (cfg.warmup_ratio, cfg.lr_scheduler) == (0.1, "cosine")


def test_llama_factory_dataset_names_read_from_its_dataset_info(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # LLaMA-Factory reads data/dataset_info.json from here
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(
        '{"identity": {"file_name": "identity.json"}, "alpaca_en_demo": {"hf_hub_url": '
        '"llamafactory/alpaca_en", "split": "train"}}')
    cfg, said = _read("llama_factory_lora_sft.yaml")
    assert cfg.data == ["data/identity.json", "llamafactory/alpaca_en@train"]
    assert ("llama_factory_lora_sft.yaml: dataset: identity,alpaca_en_demo -> data "
            "data/identity.json,llamafactory/alpaca_en@train (from data/dataset_info.json)") \
        in said


def test_an_unsloth_cli_config():
    cfg, said = _read("unsloth_cli.yaml")
    assert _settings(cfg, "model", "data", "rank", "alpha", "lr", "batch_size", "grad_accum",
                     "max_steps", "warmup_steps", "seq_len", "seed", "grad_checkpoint",
                     "rslora", "out") == {
        "model": "unsloth/Llama-3.2-1B-Instruct", "data": "yahma/alpaca-cleaned", "rank": 16,
        "alpha": 16.0, "lr": 2e-4, "batch_size": 2, "grad_accum": 4, "max_steps": 400,
        "warmup_steps": 5, "seq_len": 2048, "seed": 3407, "grad_checkpoint": True,
        "rslora": False, "out": "outputs"}
    assert "unsloth_cli.yaml: r: 16 -> rank 16" in said
    assert "unsloth_cli.yaml: use_gradient_checkpointing: unsloth -> grad_checkpoint True" in said
    warned = {line.split(": ")[2].split()[0] for line in said if line.startswith("warning: ")}
    assert warned == {"load_in_4bit", "quantization"}
    assert (cfg.weight_decay, cfg.lr_scheduler, cfg.optimizer) == (0.01, "linear", "adamw_8bit")
    assert "unsloth_cli.yaml: lr_scheduler_type: linear -> lr_scheduler linear" in said


def test_an_mlx_lm_lora_config():
    cfg, said = _read("mlx_lm_lora_config.yaml")
    # scale is the multiplier itself (y + scale * x A B): PEFT's alpha = scale x rank
    assert _settings(cfg, "model", "data", "rank", "alpha", "lora_dropout", "target_modules",
                     "lr", "max_steps", "batch_size", "seq_len", "eval_every", "save_every",
                     "train_on", "out") == {
        "model": "mlx-community/Llama-3.2-1B-Instruct-4bit", "data": "/path/to/training/data",
        "rank": 8, "alpha": 160.0, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "lr": 1e-5, "max_steps": 1000, "batch_size": 4, "seq_len": 2048, "eval_every": 200,
        "save_every": 100, "train_on": "all", "out": "adapters"}
    assert "mlx_lm_lora_config.yaml: lora_parameters.scale: 20 -> alpha 160 (scale x rank 8)" \
        in said
    assert "mlx_lm_lora_config.yaml: iters: 1000 -> max_steps 1000" in said
    warned = {line.split(": ")[2].split()[0] for line in said if line.startswith("warning: ")}
    # mlx-lm's cosine_decay ends at its third argument (1e-7), edge-tune's at a tenth of the peak
    assert warned == {"num_layers", "lr_schedule.arguments[2]"}
    # mlx-lm's adam (no decay) is AdamW with weight decay 0; cosine_decay cosine
    assert (cfg.optimizer, cfg.lr_scheduler) == ("adamw", "cosine")


def test_a_trl_config():
    cfg, said = _read("trl_sft.yaml")
    assert _settings(cfg, "model", "data", "lr", "epochs", "pack", "batch_size", "grad_accum",
                     "grad_checkpoint", "eval_every", "rank", "alpha", "full", "out") == {
        "model": "Qwen/Qwen2-0.5B", "data": "trl-lib/Capybara@train", "lr": 2e-4,
        "epochs": 1.0, "pack": True, "batch_size": 2, "grad_accum": 8, "grad_checkpoint": True,
        "eval_every": 100, "rank": 32, "alpha": 16.0, "full": False, "out": "Qwen2-0.5B-SFT"}
    assert not [line for line in said if line.startswith("warning: ")]


def test_strict_refuses_the_first_key_ignored():
    with pytest.raises(UsageError) as exc:
        build(CONFIGS / "unsloth_cli.yaml", strict=True, say=print)
    assert str(exc.value).startswith(f"{CONFIGS / 'unsloth_cli.yaml'}: load_in_4bit: ignored")
    assert "--strict" in str(exc.value)
    build(CONFIGS / "trl_sft.yaml", strict=True)  # nothing ignored: read as without it


def test_an_edge_tune_config_still_refuses_an_unknown_key(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "d.jsonl"\nrnak = 8\n')
    with pytest.raises(DataError, match="unknown key 'rnak'"):
        build(toml)
    yaml = tmp_path / "run.yaml"  # beside another tool's keys, an unknown one is ignored
    yaml.write_text("data: d.jsonl\nlora_r: 4\nrnak: 8\n")
    said: list[str] = []
    assert build(yaml, say=said.append).rank == 4
    yaml.write_text("data: d.jsonl\nlora_r: 4\nreport_to: [wandb]\n")  # HF's list form
    assert build(yaml).report_to == "wandb"
    assert any(line.startswith("warning: ") and "rnak ignored" in line for line in said)


def test_a_toml_config_takes_other_tools_keys_too(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\ndata = "d.jsonl"\nlearning_rate = 3e-4\nlora_alpha = 8\n')
    cfg = build(toml)
    assert (cfg.lr, cfg.alpha) == (3e-4, 8.0)


@pytest.mark.parametrize("text,message", [
    ("data: d\nlora_r: 8\nrank: 4\n", "rank and lora_r both set rank"),
    ("data: d\nlora_r: [8\n", r"run.yaml:3: invalid YAML"),
    ("- data\n- d\n", "expected a mapping of settings"),
    ("data: d\nlora_parameters: {rank: 8, scale: big}\n", "lora_parameters.scale: 'big'"),
    ("data: d\nstage: ppo\n", "stage: 'ppo' is not a value edge-tune can take"),
])
def test_bad_foreign_configs(tmp_path, text, message):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(DataError, match=message):
        build(f)


def test_presets_and_what_overrides_them(tmp_path):
    mlx = build(None, preset="mlx-lm", data="d.jsonl")
    assert (mlx.rank, mlx.alpha, mlx.lr, mlx.max_steps, mlx.train_on) == (8, 160.0, 1e-5, 1000,
                                                                         "all")
    assert build(None, preset="mlx-lm", data="d.jsonl", epochs=1).max_steps is None  # not iters
    unsloth = build(None, preset="unsloth", data="d.jsonl", lr=1e-4)  # a flag wins
    assert (unsloth.rank, unsloth.alpha, unsloth.lr, unsloth.batch_size,
            unsloth.grad_accum) == (16, 16.0, 1e-4, 2, 4)
    trl = build(None, preset="trl", data="d.jsonl")
    assert (trl.lr, trl.rank, trl.alpha, trl.epochs, trl.seq_len) == (2e-5, 16, 32.0, 3.0, 1024)
    assert build(None, data="d.jsonl") == build(None, preset="edge-tune", data="d.jsonl")
    f = tmp_path / "run.yaml"  # defaults < preset < config file < flags
    f.write_text("preset: unsloth\ndata: d.jsonl\nlora_alpha: 64\nlearning_rate: 5.0e-5\n")
    cfg = build(f, lr=7e-5)
    assert (cfg.preset, cfg.rank, cfg.alpha, cfg.lr) == ("unsloth", 16, 64.0, 7e-5)
    assert build(f, preset="trl").rank == 16 and build(f, preset="trl").seq_len == 1024
    with pytest.raises(UsageError, match="--preset axolotl: not a preset"):
        build(None, preset="axolotl", data="d.jsonl")
    assert set(PRESETS) == {"edge-tune", "unsloth", "mlx-lm", "trl"}


def test_flag_aliases_come_from_the_table():
    assert flag_aliases("lr") == ("--learning-rate",)
    assert set(flag_aliases("rank")) == {"--lora-r"}
    assert set(flag_aliases("epochs")) == {"--num-epochs", "--num-train-epochs"}
    assert set(flag_aliases("seq_len")) == {"--cutoff-len", "--max-seq-length"}
    assert flag_aliases("max_steps") == ("--iters",)
    assert flag_aliases("grad_accum") == ("--gradient-accumulation-steps",)
    assert flag_aliases("out") == ("--output-dir",)
    assert flag_aliases("batch_size") == ("--per-device-train-batch-size",)
    names = {f for s in ("lr", "rank", "alpha", "epochs", "seq_len") for f in flag_aliases(s)}
    assert all(ALIASES[n[2:].replace("-", "_")].convert is None for n in names)


def test_the_step_size():
    assert step_size(1e-3, 32, 16) == pytest.approx(2e-3)
    assert step_size(1e-5, 160, 8) == pytest.approx(2e-4)  # mlx-lm's defaults: 1/10 of ours
    assert step_size(2e-4, 16, 16) == pytest.approx(2e-4)  # Unsloth's
    assert step_size(1e-3, 32, 16, rslora=True) == pytest.approx(8e-3)
    from edge_tune.render.plan import step_line

    line = step_line({"lr": 1e-5, "alpha": 160.0, "rank": 8, "rslora": False,
                      "step_size": 2e-4, "default_step_size": 2e-3}, "mlx-lm")
    assert line == ("step size (preset mlx-lm): lr 1e-05 x alpha/r 160/8 = 0.0002; 1/10 of "
                    "edge-tune's default (0.002)")


def _plan(cfg: TrainConfig, budget_gib: float) -> planner.Plan:
    shape = planner.ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64,
                               ffn=1536, vocab=49152)
    machine = planner.Machine(budget_bytes=budget_gib * planner.GIB, physical_cores=2)
    return planner.fit(shape, "cpu", cfg, machine, total_steps=10)


def test_exact_refuses_instead_of_changing_the_batch():
    cfg = TrainConfig(data="d", batch_size=64, seq_len=2048, verify=False)
    loose = _plan(cfg, 2.5)
    assert loose.fits and loose.config.batch_size < 64
    with pytest.raises(UsageError) as exc:
        _plan(TrainConfig(data="d", batch_size=64, seq_len=2048, verify=False, exact=True), 2.5)
    assert str(exc.value).startswith("--exact: batch size 64, grad-accum 1 and seq-len 2048 "
                                     "need ~")
    exact = _plan(TrainConfig(data="d", batch_size=2, seq_len=256, verify=False, exact=True), 64)
    assert exact.fits and not exact.changes


def test_the_manifest_records_the_resolved_settings_as_edge_tune_keys():
    from edge_tune import manifest as manifest_mod
    from tests.integration.test_manifest import WRITTEN

    cfg, _ = _read("mlx_lm_lora_config.yaml")
    man = manifest_mod.build(config=cfg.to_dict(), backend="cpu", backend_reason="x",
                             base=WRITTEN["base"], data=WRITTEN["data"],
                             result=WRITTEN["result"], tokenizer={}, adapter=WRITTEN["adapter"])
    written = man.to_dict()["hyperparameters"]
    assert (written["rank"], written["alpha"], written["lr"], written["max_steps"],
            written["target_modules"]) == (8, 160.0, 1e-5, 1000, ["q_proj", "v_proj"])
    assert not {"lora_parameters", "iters", "learning_rate"} & set(written)


def _yaml(tmp_path, text: str, **flags) -> tuple[TrainConfig, list[str]]:
    f = tmp_path / "run.yaml"
    f.write_text(text)
    said: list[str] = []
    cfg = build(f, say=lambda line: said.append(line.replace(f"{tmp_path}/", "")), **flags)
    return cfg, said


def _warned(said: list[str]) -> dict[str, str]:
    return {line.split(": ")[2].split()[0]: line for line in said
            if line.startswith("warning: ")}


AXOLOTL_CHAT = """base_model: m
datasets:
  - path: org/chats
    type: chat_template
    name: default
    split: train[:10]
    field_messages: dialog
    message_property_mappings: {role: role, content: content}
    roles_to_train: ["user", "assistant"]
    train_on_eos: all
"""


def test_each_key_of_an_axolotl_dataset_entry_is_mapped(tmp_path):
    cfg, said = _yaml(tmp_path, AXOLOTL_CHAT)
    assert (cfg.data, cfg.columns, cfg.train_on) == ("org/chats:default@train[:10]",
                                                     "dialog=messages", "all")
    assert "run.yaml: datasets[0].split: train[:10] -> data org/chats:default@train[:10]" in said
    assert "run.yaml: datasets[0].field_messages: dialog -> columns dialog=messages" in said
    assert any(line.startswith("run.yaml: datasets[0].roles_to_train: user,assistant -> "
                               "train_on all") for line in said)
    assert any(line.startswith("run.yaml: datasets[0].train_on_eos: all -> nothing to set")
               for line in said)
    assert not _warned(said)


def test_an_axolotl_dataset_entry_s_keys_it_cannot_honour_are_named(tmp_path):
    text = ("datasets:\n  - path: ./chats.jsonl\n    split: train[:10]\n"
            "    message_property_mappings: {role: speaker, content: text}\n"
            "    roles_to_train: [user]\n    train_on_eos: last\n    shards: 4\n")
    cfg, said = _yaml(tmp_path, text)
    assert cfg.data == "./chats.jsonl"
    warned = _warned(said)
    assert set(warned) == {"datasets[0].split", "datasets[0].message_property_mappings",
                           "datasets[0].roles_to_train", "datasets[0].train_on_eos",
                           "datasets[0].shards"}
    assert "a hub dataset's split; ./chats.jsonl is a local file" in warned["datasets[0].split"]
    f = tmp_path / "run.yaml"
    with pytest.raises(UsageError, match=r"run.yaml: datasets\[0\].split: ignored"):
        build(f, strict=True)


def test_an_mlx_lm_lr_schedule_maps_its_warmup_and_arguments(tmp_path):
    cfg, said = _yaml(tmp_path, "data: d\niters: 8\nlr_schedule: {name: cosine_decay, "
                                "warmup: 2, arguments: [1.0e-5, 8, 1.0e-7]}\n")
    assert (cfg.lr, cfg.warmup_steps, cfg.lr_scheduler, cfg.max_steps) == (1e-5, 2, "cosine", 8)
    assert "run.yaml: lr_schedule.warmup: 2 -> warmup_steps 2" in said
    assert "run.yaml: lr_schedule.arguments[0]: 1e-05 -> lr 1e-05 (the schedule's peak)" in said
    assert any(line.startswith("run.yaml: lr_schedule.arguments[1]: 8 -> nothing to set")
               for line in said)
    assert "a tenth of the peak (1e-06)" in _warned(said)["lr_schedule.arguments[2]"]
    # the end at a tenth, a warm-up from above 0, a decay shorter than the run
    _, said = _yaml(tmp_path, "data: d\niters: 100\nlr_schedule: {name: cosine_decay, warmup: 5,"
                              " warmup_init: 1.0e-6, arguments: [1.0e-4, 50, 1.0e-5]}\n")
    assert set(_warned(said)) == {"lr_schedule.warmup_init", "lr_schedule.arguments[1]"}
    with pytest.raises(DataError, match=r"lr_schedule.arguments\[0\] and learning_rate both set"):
        _yaml(tmp_path, "data: d\nlearning_rate: 2.0e-4\nlr_schedule: {name: cosine_decay, "
                        "arguments: [1.0e-5, 8]}\n")


def test_one_line_per_key_and_one_form_of_the_file_name(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("data: d\nlora_r: 8\noptimizer: adamw_torch\nnum_layers: 4\n")
    said: list[str] = []
    build(f, say=said.append)
    assert [line for line in said if "optimizer" in line] == [
        f"{f}: optimizer: adamw_torch -> optimizer adamw"]
    assert all(line.removeprefix("warning: ").startswith(f"{f}: ") for line in said)


def test_kto_and_grpo_keys_of_other_tools(tmp_path):
    cfg, said = _yaml(tmp_path, "data: d\nrl: kto\nkto_desirable_weight: 2\n"
                                "kto_undesirable_weight: 0.5\n")
    assert (cfg.method, cfg.desirable_weight, cfg.undesirable_weight) == ("kto", 2.0, 0.5)
    assert not _warned(said)
    cfg, said = _yaml(tmp_path, "data: d\nstage: kto\nkto_chosen_weight: 1.5\n")
    assert cfg.desirable_weight == 1.5
    cfg, said = _yaml(tmp_path, "model_name_or_path: m\ndataset_name: org/p\nstage: grpo\n"
                                "reward: [json]\nnum_generations: 4\nper_device_train_batch_size:"
                                " 8\nmax_completion_length: 64\nbeta: 0.0\nloss_type: dr_grpo\n"
                                "epsilon: 0.3\ntemperature: 0.7\nreward_weights: [1.0]\n")
    assert (cfg.num_generations, cfg.max_completion_length, cfg.beta, cfg.loss_type,
            cfg.epsilon, cfg.temperature, cfg.reward_weights) == (4, 64, 0.0, "dr_grpo", 0.3,
                                                                  0.7, ["1"])
    assert not _warned(said)


def test_beta_from_a_file_is_named_by_the_file(tmp_path):
    # TRL's beta without a method: sft does not use it, so a warning, not a refusal
    cfg, said = _yaml(tmp_path, "model_name_or_path: m\ndataset_name: org/p\nbeta: 0\n")
    assert (cfg.method, cfg.beta) == ("sft", 0.0)
    assert _warned(said)["beta"] == ("warning: run.yaml: beta 0: no effect with method sft "
                                     "(beta is DPO's, KTO's, ORPO's and GRPO's; set the method: "
                                     "--method, or stage/rl in the file)")
    f = tmp_path / "run.yaml"
    with pytest.raises(UsageError, match="run.yaml: beta: ignored"):
        build(f, strict=True)
    f.write_text("data: d\nrl: dpo\nrl_beta: 0\n")
    with pytest.raises(UsageError) as exc:
        build(f)
    assert str(exc.value) == (f"{f}: rl_beta 0: method dpo (rl) needs a beta > 0 (0 turns the "
                              "KL term off, which only GRPO allows)")
    with pytest.raises(UsageError, match="^--beta 0: method dpo"):
        build(f, beta=0.0)  # the flag wins, and is named
    assert build(f, beta=0.2).beta == 0.2
