"""The exporter: train.py really trains (tiny random models on the CPU), its configs are the plan's,
and the multi-GPU configs match the strategy. No network: models and tokenizers are built locally."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from app import __version__
from app.catalog import Catalog
from app.cli import main as cli_main
from app.export import export_files, export_zip, write_files
from app.planner import plan
from app.units import GIB
from app.workload import Hardware, ModelSpec, Training, Workload
from tests.test_planner import FLAN_T5_RECIPE, LLAMA2_7B_T4

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "fine tuning small models is fast", "memory is what we plan"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def workload(data: dict[str, Any]) -> Workload:
    return Workload.model_validate(data)


def save_tokenizer(folder: Path, special: list[str]) -> int:
    """A word-level tokenizer trained on a few sentences, saved as a PreTrainedTokenizerFast; its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=special))
    names = {"[PAD]": "pad_token", "[UNK]": "unk_token", "[BOS]": "bos_token", "[EOS]": "eos_token", "[CLS]": "cls_token", "[SEP]": "sep_token"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{names[token]: token for token in special})
    fast.save_pretrained(folder)
    return len(fast)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight llama, T5 and BERT models with tokenizers, and small JSONL datasets."""
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("tiny")
    vocab = save_tokenizer(root / "llama", ["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                                 eos_token_id=3)).save_pretrained(root / "llama")
    vocab = save_tokenizer(root / "t5", ["[PAD]", "[UNK]", "[EOS]"])
    T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=2,
                                        decoder_start_token_id=0)).save_pretrained(root / "t5")
    vocab = save_tokenizer(root / "bert", ["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=64)).save_pretrained(root / "bert")
    (root / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * 2))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"dialogue": s, "summary": s.split()[-1]}) + "\n" for s in SENTENCES * 2))
    (root / "labels.jsonl").write_text("".join(json.dumps({"text": s, "label": i % 2}) + "\n" for i, s in enumerate(SENTENCES * 2)))
    return {"root": root, "llama": root / "llama", "t5": root / "t5", "bert": root / "bert"}


def tiny_workload(folder: Path, **blocks: Any) -> Workload:
    config = json.loads((folder / "config.json").read_text())
    data = {"model": {"config": config}, "hardware": {"gpu": "A100-40GB"},
            "training": {"max_seq_length": 32, "per_device_train_batch_size": 4}, **blocks}
    return workload(data)


def run_exported(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE}
    return subprocess.run([sys.executable, str(folder / "train.py"), "--max-steps", "1", "--cpu", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def load_script(path: Path):
    """Import an exported train.py as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(f"exported_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the scripts train -----------------------------------------------------------------------


@pytest.mark.parametrize("method, blocks, saved", [
    ("full", {"lora": None, "quantization": None}, "model.safetensors"),
    ("lora", {"lora": {"r": 4}, "quantization": None}, "adapter_model.safetensors"),
])
def test_exported_plan_trains_one_step_on_the_cpu_and_saves(tiny, catalog: Catalog, tmp_path: Path, method, blocks, saved):
    chosen = plan(tiny_workload(tiny["llama"], **blocks), catalog).plans[0].workload
    assert chosen.method == method
    write_files(chosen, catalog, tmp_path)
    out = tmp_path / "out"
    done = run_exported(tmp_path, "--model", str(tiny["llama"]), "--dataset", str(tiny["root"] / "text.jsonl"), "--output-dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / saved).is_file()
    assert (out / "checkpoint-1").is_dir()


def test_exported_seq2seq_lora_trains_one_step_on_the_cpu(tiny, catalog: Catalog, tmp_path: Path):
    chosen = plan(tiny_workload(tiny["t5"], lora={"r": 4}, quantization=None), catalog).plans[0].workload
    files = write_files(chosen, catalog, tmp_path)
    assert "Seq2SeqTrainer(" in files[0].read_text()
    done = run_exported(tmp_path, "--model", str(tiny["t5"]), "--dataset", str(tiny["root"] / "pairs.jsonl"),
                        "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_exported_classification_lora_trains_one_step_on_the_cpu(tiny, catalog: Catalog, tmp_path: Path):
    chosen = plan(tiny_workload(tiny["bert"], lora={"r": 4}, quantization=None), catalog).plans[0].workload
    write_files(chosen, catalog, tmp_path)
    done = run_exported(tmp_path, "--model", str(tiny["bert"]), "--dataset", str(tiny["root"] / "labels.jsonl"),
                        "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# --- QLoRA and the flan-t5 recipe: every config object is built ------------------------------


def test_qlora_export_builds_every_config_object(catalog: Catalog, tmp_path: Path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from peft import LoraConfig, TaskType
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    chosen = plan(workload(LLAMA2_7B_T4), catalog).plans[0].workload
    write_files(chosen, catalog, tmp_path)
    script = load_script(tmp_path / "train.py")
    configs = script.build_configs(script.parse_args(["--output-dir", str(tmp_path / "out")]))
    quantization, peft_config, args = configs["quantization_config"], configs["peft_config"], configs["training_args"]
    assert isinstance(quantization, BitsAndBytesConfig) and quantization.load_in_4bit
    assert quantization.bnb_4bit_quant_type == "nf4" and quantization.bnb_4bit_use_double_quant
    assert quantization.bnb_4bit_compute_dtype == torch.float16
    assert isinstance(peft_config, LoraConfig) and peft_config.task_type == TaskType.CAUSAL_LM
    assert (peft_config.r, peft_config.target_modules) == (chosen.lora.r, "all-linear")
    assert isinstance(args, SFTConfig)
    assert (args.fp16, args.bf16) == (True, False)  # the T4 has no bf16
    assert args.max_length == 512
    assert args.per_device_train_batch_size == chosen.training.per_device_train_batch_size
    assert args.gradient_accumulation_steps == chosen.training.gradient_accumulation_steps
    assert args.activation_checkpointing == chosen.training.gradient_checkpointing
    assert script.MODEL == "meta-llama/Llama-2-7b-hf"
    # the script casts the adapters to the planned dtype (trl's bf16 for a quantized model by default)
    assert script.ADAPTER_DTYPE is getattr(torch, chosen.lora.adapter_dtype.value)


def test_flan_t5_recipe_export_is_corrected_for_a_t4(catalog: Catalog, tmp_path: Path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from peft import TaskType
    from transformers import Seq2SeqTrainingArguments

    files = export_files(workload(FLAN_T5_RECIPE), catalog)
    text = files["train.py"]
    assert "AutoModelForSeq2SeqLM.from_pretrained(" in text and "AutoModelForCausalLM" not in text.split('"""', 2)[2]
    assert "task_type=TaskType.SEQ_2_SEQ_LM" in text
    assert "bnb_4bit_compute_dtype=torch.float16" in text
    header = text.split('"""', 2)[1]
    for expected in ("fp16 mixed precision instead of bf16", "bnb_4bit_compute_dtype float16 instead of bfloat16",
                     "tf32 off", "AutoModelForSeq2SeqLM"):
        assert expected in " ".join(header.split()), expected
    (tmp_path / "train.py").write_text(text)
    script = load_script(tmp_path / "train.py")
    configs = script.build_configs(script.parse_args(["--output-dir", str(tmp_path / "out")]))
    args = configs["training_args"]
    assert isinstance(args, Seq2SeqTrainingArguments)
    assert (args.fp16, args.bf16, args.tf32) == (True, False, False)
    assert configs["peft_config"].task_type == TaskType.SEQ_2_SEQ_LM
    assert (configs["peft_config"].r, configs["peft_config"].lora_alpha, configs["peft_config"].lora_dropout) == (64, 16, 0.1)
    assert configs["quantization_config"].bnb_4bit_compute_dtype == torch.float16


# --- files and their agreement ---------------------------------------------------------------


def test_header_states_the_estimate_and_the_vramplan_version(catalog: Catalog):
    chosen = plan(workload(LLAMA2_7B_T4), catalog).plans[0]
    header = export_files(chosen.workload, catalog)["train.py"].split('"""', 2)[1]
    assert f"Planned by vramplan {__version__}" in header
    assert f"estimated peak {chosen.estimate.peak_bytes / GIB:.2f} GiB" in header
    assert "transformers 5.24.0" in header


def test_config_yaml_holds_the_same_settings_as_train_py(catalog: Catalog, tmp_path: Path):
    chosen = plan(workload(LLAMA2_7B_T4), catalog).plans[0].workload
    files = export_files(chosen, catalog)
    config = yaml.safe_load(files["config.yaml"])
    training = config["training_arguments"]
    assert training["per_device_train_batch_size"] == chosen.training.per_device_train_batch_size
    assert (training["fp16"], training["bf16"]) == (True, False)
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == "torch.float16"
    assert config["peft_config"]["r"] == chosen.lora.r
    assert Workload.model_validate(config["workload"]).training.max_seq_length == 512
    for key, value in training.items():
        if key not in ("class", "trainer") and isinstance(value, int | float) and not isinstance(value, bool):
            assert f"{key}={value!r}" in files["train.py"], key


def multi_gpu(strategy: str, **flags: bool) -> Workload:
    return workload({"model": {"id": "meta-llama/Llama-2-13b-hf", "dtype": "float32"}, "hardware": {"gpu": "A100-80GB", "num_gpus": 4},
                     "training": {"bf16": True, "max_seq_length": 1024}, "distributed": {"strategy": strategy, **flags}})


def test_single_gpu_export_has_no_launcher_configs(catalog: Catalog):
    assert set(export_files(workload(LLAMA2_7B_T4), catalog)) == {"train.py", "config.yaml"}


def test_ddp_export_adds_the_accelerate_launcher(catalog: Catalog):
    files = export_files(multi_gpu("ddp"), catalog)
    assert set(files) == {"train.py", "config.yaml", "accelerate.yaml"}
    launcher = yaml.safe_load(files["accelerate.yaml"])
    assert (launcher["distributed_type"], launcher["num_processes"], launcher["mixed_precision"]) == ("MULTI_GPU", 4, "bf16")
    assert "accelerate launch --config_file accelerate.yaml train.py" in files["train.py"]


def test_zero3_offload_export_writes_the_deepspeed_config(catalog: Catalog):
    files = export_files(multi_gpu("zero3", offload_optimizer=True, offload_params=True), catalog)
    assert set(files) == {"train.py", "config.yaml", "accelerate.yaml", "deepspeed.json"}
    zero = json.loads(files["deepspeed.json"])["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert 'deepspeed=os.path.join(HERE, "deepspeed.json") if on_gpu else None' in files["train.py"]


def test_fsdp_export_writes_fsdp_yaml_with_checkpointing_inside(catalog: Catalog):
    files = export_files(multi_gpu("fsdp"), catalog)
    assert set(files) == {"train.py", "config.yaml", "accelerate.yaml", "fsdp.yaml"}
    fsdp = yaml.safe_load(files["fsdp.yaml"])
    assert fsdp["version"] == 2 and fsdp["activation_checkpointing"] is True
    assert "activation_checkpointing=False" in files["train.py"]  # FSDP's own checkpointing instead (transformers docs)
    assert "fsdp=on_gpu" in files["train.py"]


def test_every_exported_script_compiles(catalog: Catalog):
    workloads = [workload(LLAMA2_7B_T4), workload(FLAN_T5_RECIPE), multi_gpu("fsdp"), multi_gpu("zero2"),
                 workload({"model": {"id": "google-bert/bert-base-uncased"}, "hardware": {"gpu": "T4"}, "lora": {"r": 8}}),
                 workload({"model": {"id": "Qwen/Qwen2.5-0.5B"}, "peft": {"peft_type": "IA3"}, "hardware": {"gpu": "4090"}}),
                 workload({"model": {"id": "meta-llama/Llama-2-7b-hf"}, "hardware": {"gpu": "A100-80GB"},
                           "training": {"frozen_layers": 16, "loss_implementation": "fused_linear_cross_entropy"}})]
    for w in workloads:
        compile(export_files(w, catalog)["train.py"], "train.py", "exec")


def test_export_zip_is_deterministic(catalog: Catalog):
    first = export_zip(workload(FLAN_T5_RECIPE), catalog)
    assert first == export_zip(workload(FLAN_T5_RECIPE), catalog)
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert sorted(archive.namelist()) == ["config.yaml", "train.py"]


def test_export_refuses_a_bare_parameter_count(catalog: Catalog):
    with pytest.raises(ValueError, match="architecture"):
        export_files(workload({"model": {"num_parameters": 7_000_000_000}}), catalog)


def test_cli_export_writes_the_best_plan(tmp_path: Path, capsys):
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(LLAMA2_7B_T4))
    assert cli_main(["export", "--workload", str(path), "--plan", "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.yaml", "train.py"]
    assert "load_in_4bit=True" in (tmp_path / "out" / "train.py").read_text()


def test_several_gpu_plan_exports(catalog: Catalog):
    w = Workload.model_construct(model=ModelSpec(id="meta-llama/Llama-2-13b-hf"), hardware=Hardware(gpu="A100-40GB", num_gpus=4),
                                 training=Training(max_seq_length=2048))
    chosen = plan(w, catalog).plans[0].workload
    files = export_files(chosen, catalog)
    assert "accelerate.yaml" in files
    assert yaml.safe_load(files["accelerate.yaml"])["num_processes"] == 4


@pytest.mark.parametrize("name", ['org/model"; import os; os.system("id") #', 'x"""\nimport os\n"""', "a b; rm -rf ~", "ok/name\\"])
def test_a_config_name_that_could_break_out_of_the_script_is_never_written_into_it(catalog: Catalog, name: str):
    """Library callers skip the edge's check_config: the exporter itself keeps such a name out of train.py."""
    config = {**catalog.model("meta-llama/Llama-3.2-1B").config, "_name_or_path": name}
    workload = Workload(model=ModelSpec(config=config), training=Training(per_device_train_batch_size=1, max_seq_length=256),
                        hardware=Hardware(gpu="A100-80GB"))
    files = export_files(workload, catalog)
    assert name not in files["train.py"]
    compile(files["train.py"], "train.py", "exec")  # still a valid script
    assert yaml.safe_load(files["config.yaml"])["workload"]["model"]["config"]["_name_or_path"] == name  # data in config.yaml
