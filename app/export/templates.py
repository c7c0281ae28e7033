"""The text of the exported train.py: fixed code with ``$placeholders`` (string.Template) that
app/export/script.py fills from ExportSettings. One template per trainer: trl's SFTTrainer for causal
LMs, Seq2SeqTrainer for encoder-decoders (T5), Trainer for sequence classification (BERT)."""

HEADER = '''#!/usr/bin/env python
"""$title

Planned by vramplan $version for $num_gpus x $gpu_name:
  $method, $precision
  estimated peak $peak_gib GiB per GPU during $peak_phase (nvidia-smi; allocated $allocated_gib GiB,
  reserved $reserved_gib GiB) of $usable_gib GiB usable: $verdict.
  Estimated with $libraries.
$corrections
Run:
  pip install $requirements
  $launch --model $model_example --dataset data.jsonl
Smoke test on a CPU (float32, no quantization, torch AdamW):
  python train.py --model ./tiny-model --dataset tiny.jsonl --max-steps 1 --cpu
"""

import argparse
import os

import torch
from datasets import load_dataset
$imports

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = $model_default
DATASET = $dataset_default
MAX_LENGTH = $max_length
$constants

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Fine-tune $model_name as planned by vramplan.")
    parser.add_argument("--model", default=MODEL, required=MODEL is None, help="Hugging Face model id or local directory")
    parser.add_argument("--dataset", default=DATASET, help="a .json/.jsonl file, or a Hugging Face dataset name")
$column_arguments
    parser.add_argument("--output-dir", default="output", help="where checkpoints and the final model go")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: one epoch)")
    parser.add_argument("--cpu", action="store_true", help="smoke test on the CPU: float32, no quantization, torch AdamW")
    return parser.parse_args(argv)


def build_configs(args):
    """Every config object the run uses, set to the plan (the CPU smoke test turns off what needs a GPU)."""
    on_gpu = not args.cpu
    quantization_config = $quantization_config
    peft_config = $peft_config
    training_args = $training_args
    return {"quantization_config": quantization_config, "peft_config": peft_config, "training_args": training_args}


def load_data(args):
    if args.dataset.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files=args.dataset, split="train")
    return load_dataset(args.dataset, split="train")


def load_model(args, quantization_config, **kwargs):
    model = $auto_class.from_pretrained(
        args.model,
        dtype=$dtype if not args.cpu else torch.float32,
        attn_implementation="$attn_implementation",
        quantization_config=quantization_config,
        device_map=$device_map,
        **kwargs,
    )
$prepare_model
    return model


def cast_trainable(model, dtype):
    """Keep the trainable (adapter) parameters in the dtype the plan assumes."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def freeze_first_blocks(model, count):
    """Freeze the first `count` transformer blocks (the plan's frozen_layers)."""
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    for block in blocks[:count]:
        block.requires_grad_(False)


def load_yaml(path):
    import yaml

    with open(path) as file:
        return yaml.safe_load(file)

'''

MAIN_SFT = '''
def main(argv=None):
    args = parse_args(argv)
    configs = build_configs(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(args, configs["quantization_config"])
    if FROZEN_LAYERS:
        freeze_first_blocks(model, FROZEN_LAYERS)
    trainer = SFTTrainer(
        model=model,
        args=configs["training_args"],
        train_dataset=load_data(args),
        processing_class=tokenizer,
        peft_config=configs["peft_config"],
    )
    if ADAPTER_DTYPE is not None:
        cast_trainable(trainer.model, ADAPTER_DTYPE)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
'''

# Trainer and Seq2SeqTrainer take a model with its adapters already on (SFTTrainer adds them itself).
ADAPT = '''
def adapt(model, configs):
    """Freeze the plan's first blocks, then put the PEFT adapters on (in the plan's adapter dtype)."""
    if FROZEN_LAYERS:
        freeze_first_blocks(model, FROZEN_LAYERS)
    if configs["peft_config"] is not None:
        model = get_peft_model(model, configs["peft_config"])
        if configs["training_args"].activation_checkpointing:
            model.enable_input_require_grads()
        cast_trainable(model, ADAPTER_DTYPE)
    return model

'''

MAIN_SEQ2SEQ = ADAPT + '''
def main(argv=None):
    args = parse_args(argv)
    configs = build_configs(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args, configs["quantization_config"])
    model = adapt(model, configs)

    def tokenize(batch):
        features = tokenizer(batch[args.source_column], max_length=MAX_LENGTH, truncation=True)
        targets = tokenizer(text_target=batch[args.target_column], max_length=MAX_TARGET_LENGTH, truncation=True)
        features["labels"] = targets["input_ids"]
        return features

    dataset = load_data(args)
    dataset = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    trainer = Seq2SeqTrainer(
        model=model,
        args=configs["training_args"],
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
'''

MAIN_CLASSIFICATION = ADAPT + '''
def main(argv=None):
    args = parse_args(argv)
    configs = build_configs(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_data(args)
    num_labels = len(set(dataset[args.label_column]))
    model = load_model(args, configs["quantization_config"], num_labels=num_labels)
    model = adapt(model, configs)

    def tokenize(batch):
        features = tokenizer(batch[args.text_column], max_length=MAX_LENGTH, truncation=True)
        features["labels"] = batch[args.label_column]
        return features

    dataset = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    trainer = Trainer(
        model=model,
        args=configs["training_args"],
        train_dataset=dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
'''

MAINS = {"SFTTrainer": MAIN_SFT, "Seq2SeqTrainer": MAIN_SEQ2SEQ, "Trainer": MAIN_CLASSIFICATION}

COLUMN_ARGUMENTS = {
    "SFTTrainer": [("text-column", "text", "the dataset column holding the training text")],
    "Seq2SeqTrainer": [("source-column", "source", "the dataset column holding the input text"),
                       ("target-column", "target", "the dataset column holding the target text")],
    "Trainer": [("text-column", "text", "the dataset column holding the text"),
                ("label-column", "label", "the dataset column holding integer class labels")],
}
