"""QLoRA: ``svd-serve train --quantize`` against PEFT + bitsandbytes + transformers ``Trainer``.

    python bench/qlora.py                                        # toy llama
    python bench/qlora.py --base "$(python scripts/smollm2.py)"  # SmolLM2-135M-Instruct, chat rows

svd-serve trains in float32, bfloat16 (a full-precision base in that dtype), nf4 and int8 (the base's
Linear layers quantized by bitsandbytes, compute dtype ``--compute-dtype``); PEFT + Trainer trains on
the same quantization, loaded by transformers' ``BitsAndBytesConfig`` (nf4: blocks of 64, no double
quantization, the same compute dtype; int8: LLM.int8() with threshold 6, as svd-serve's), prepared
with ``prepare_model_for_kbit_training`` (no gradient checkpointing on either side), padding-free
batches (``DataCollatorWithFlattening``), fused AdamW, constant lr, clipping at 1.0. The same rows in
the same order, batch, steps, targets and rank. LoRA: PEFT starts from svd-serve's initial adapter
(copied), so on the same quantized weights the two loss curves must agree (``max|dloss|``). PiSSA:
PEFT's recipe for a quantized base (it refuses ``init_lora_weights="pissa"`` on one): PiSSA on the
full-precision model, the residual ``W − B A`` saved as a new base and the adapter beside it (a
preparation process, not measured), then the residual loaded quantized with that adapter
trainable: another model than svd-serve's (which quantizes W and keeps ``B A`` exact), so its loss
is not compared.

Every run is its own process (peak RSS is its own: loading included), one after another, with
``--threads`` threads. Seconds per step: median over the steps after ``--warmup`` (wall time from the
end of one step to the end of the next: data, forward, backward, clipping, optimizer, records).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchlib import BASE_HELP, base_model, chat_rows, load_line, write_jsonl  # noqa: E402

TOY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
LR, SEED, MAX_LENGTH = 1e-3, 0, 128
GOAL_SPEED, GOAL_RSS = 1.2, 1.0
SVD_RUNS = ("float32", "bfloat16", "nf4", "int8")
PEFT_QUANT = ("nf4", "int8")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_svd(spec: dict) -> dict:
    """``svd_serve.training.train``; its fresh adapter is saved (outside the timed loop) for PEFT."""
    import svd_serve.training as t
    from svd_serve.adapter import AdapterSet

    work, kind = Path(spec["work"]), spec["kind"]
    create = AdapterSet.create

    def create_and_keep(*args, **kwargs):
        adapters = create(*args, **kwargs)
        adapters.save(work / f"init-{spec['method']}-{kind}", overwrite=True)
        return adapters

    AdapterSet.create = create_and_keep
    quantize = kind if kind in PEFT_QUANT else None
    out = work / f"svd-{spec['method']}-{kind}"
    t.train(t.TrainConfig(base=spec["base"], data=spec["data"], out=str(out), method=spec["method"], rank=spec["rank"],
                          targets=spec["targets"], steps=spec["steps"], batch_size=spec["batch"], lr=LR,
                          schedule="constant", max_length=MAX_LENGTH, seed=SEED, quantize=quantize,
                          dtype=spec["compute"] if quantize else kind, progress=False))
    records = [r for line in (out / "metrics.jsonl").open() if (r := json.loads(line))["step"] > 0]
    ends = [0.0] + [r["elapsed"] for r in records]
    return {"step_seconds": [b - a for a, b in zip(ends, ends[1:])], "losses": [r["loss"] for r in records],
            "peak_rss_mb": peak_rss_mb()}


def run_peft(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from torch.utils.data import SequentialSampler
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorWithFlattening,
                              Trainer, TrainerCallback, TrainingArguments)

    from svd_serve.adapter import AdapterSet
    from svd_serve.dataset import encode, read_jsonl
    from svd_serve.training import COMPUTE_DTYPES, global_batch

    torch.manual_seed(SEED)
    work, method, kind = Path(spec["work"]), spec["method"], spec["kind"]
    compute = COMPUTE_DTYPES[spec["compute"]]
    tokenizer = AutoTokenizer.from_pretrained(spec["base"])
    examples = [encode(r, tokenizer, MAX_LENGTH) for r in read_jsonl(spec["data"])]
    order = [i for s in range(spec["steps"]) for i in global_batch(s, len(examples), spec["batch"], SEED)]
    dataset = [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in order]
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                bnb_4bit_use_double_quant=False) if kind == "nf4"
             else BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0))
    pissa = work / "peft-pissa"
    model = AutoModelForCausalLM.from_pretrained(pissa / "residual" if method == "pissa" else spec["base"],
                                                 quantization_config=quant, dtype=compute, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method == "pissa":
        model = PeftModel.from_pretrained(model, pissa / "adapter", is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0,
                                                 target_modules=spec["targets"].split(",")))
    if method == "lora":  # svd-serve's initial adapter, exactly
        init = AdapterSet.load(work / f"init-lora-{kind}")
        with torch.no_grad():
            for name, layer in init.items():
                module = model.base_model.model.get_submodule(name)
                module.lora_A["default"].weight.copy_(layer.A)
                module.lora_B["default"].weight.copy_(layer.B)

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(loss.detach())
            return loss

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.ends = [time.perf_counter()]

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(work / "peft"), per_device_train_batch_size=spec["batch"],
                             max_steps=spec["steps"], learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=1.0, optim="adamw_torch_fused", logging_strategy="no", save_strategy="no",
                             eval_strategy="no", report_to=[], use_cpu=True, seed=SEED, disable_tqdm=True,
                             dataloader_num_workers=0, remove_unused_columns=False)
    clock, losses = Clock(), []
    trainer = OrderedTrainer(model=model, args=args, train_dataset=dataset, callbacks=[clock],
                              data_collator=DataCollatorWithFlattening())
    trainer.train()
    return {"step_seconds": [b - a for a, b in zip(clock.ends, clock.ends[1:])],
            "losses": [x.item() for x in losses], "peak_rss_mb": peak_rss_mb()}


def prepare_peft_pissa(spec: dict) -> dict:
    """PEFT's PiSSA for a quantized base, step one: the full-precision residual base and the adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(spec["work"]) / "peft-pissa"
    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0,
                                             target_modules=spec["targets"].split(","), init_lora_weights="pissa"))
    model.peft_config["default"].init_lora_weights = True  # the saved adapter is loaded, not re-initialised
    model.save_pretrained(out / "adapter")
    model.unload().save_pretrained(out / "residual")  # W − B A
    return {}


RUNNERS = {"svd": run_svd, "peft": run_peft, "peft-pissa-prep": prepare_peft_pissa}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help=BASE_HELP)
    p.add_argument("--methods", default="lora,pissa")
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--compute-dtype", default="float32", help="compute dtype of the quantized runs (both sides)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the figures")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--svd", default=",".join(SVD_RUNS), help="svd-serve runs: float32, bfloat16, nf4, int8 (comma list)")
    p.add_argument("--peft", default=",".join(PEFT_QUANT), help="PEFT + bitsandbytes runs: nf4, int8 (comma list)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:  # one run in this process; the result as the last stdout line
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(RUNNERS[a.worker](json.loads(Path(a.spec).read_text()))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, what = base_model(a.base, work, **TOY)
        data = write_jsonl(work / "data.jsonl", chat_rows())
        import torch

        print(f"model: {what}\ndata: chat rows; rank {a.rank} on {a.targets}; batch {a.batch_size}, {a.steps} steps "
              f"(figures: medians over steps {a.warmup + 1}-{a.steps}); quantized runs compute in {a.compute_dtype}; "
              f"CPU, {a.threads} threads; torch {torch.__version__}; {load_line()} at start\n")

        def worker(runner: str, spec: dict) -> dict:
            (work / "spec.json").write_text(json.dumps(spec))
            cmd = [sys.executable, __file__, "--worker", runner, "--spec", str(work / "spec.json"),
                   "--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{runner} {spec['method']} {spec['kind']} failed:\n{proc.stderr[-3000:]}")
            return json.loads(proc.stdout.strip().splitlines()[-1])

        spec = dict(base=str(base), data=str(data), work=str(work), targets=a.targets, rank=a.rank, steps=a.steps,
                    batch=a.batch_size, compute=a.compute_dtype)
        print(f"{'method':7s} {'run':28s} {'s/step':>7s} {'x PEFT':>7s} {'RSS MB':>7s} {'RSS/PEFT':>8s} "
              f"{'max|dloss|':>10s}")
        goals = []
        for method in a.methods.split(","):
            svd_kinds, peft_kinds = a.svd.split(","), [k for k in a.peft.split(",") if k]
            runs = {("svd", k): worker("svd", {**spec, "method": method, "kind": k}) for k in svd_kinds}
            if method == "pissa" and peft_kinds:
                worker("peft-pissa-prep", {**spec, "method": method, "kind": "float32"})
            runs.update({("peft", k): worker("peft", {**spec, "method": method, "kind": k}) for k in peft_kinds})
            s_step = {key: statistics.median(r["step_seconds"][a.warmup:]) for key, r in runs.items()}
            for (side, kind), run in runs.items():
                peft = ("peft", kind) if ("peft", kind) in runs else None
                label = f"svd-serve {kind}" if side == "svd" else f"PEFT + bnb + Trainer {kind}"
                speed = f"{s_step[peft] / s_step[(side, kind)]:.2f}" if peft else "-"
                rss = f"{run['peak_rss_mb'] / runs[peft]['peak_rss_mb']:.2f}" if peft else "-"
                gap = "-"
                if side == "peft" and method == "lora":  # the same init on the same quantized weights
                    gap = f"{max(abs(x - y) for x, y in zip(run['losses'], runs[('svd', kind)]['losses'])):.2e}"
                print(f"{method:7s} {label:28s} {s_step[(side, kind)]:7.3f} {speed:>7s} {run['peak_rss_mb']:7.0f} "
                      f"{rss:>8s} {gap:>10s}")
            for kind in [k for k in peft_kinds if ("svd", k) in runs]:
                speed = s_step[("peft", kind)] / s_step[("svd", kind)]
                rss = runs[("svd", kind)]["peak_rss_mb"] / runs[("peft", kind)]["peak_rss_mb"]
                met = "met" if speed >= GOAL_SPEED and rss <= GOAL_RSS else "NOT met"
                goals.append(f"{method} {kind}: svd-serve {speed:.2f}x PEFT's speed at {rss:.2f}x its peak RSS -> {met} "
                             f"(goal >= {GOAL_SPEED}x at <= {GOAL_RSS}x)")
            if ("svd", "float32") in runs:
                f32 = s_step[("svd", "float32")]
                goals.append(f"{method}: svd-serve step time against its float32 run: " + ", ".join(
                    f"{k} {f32 / s_step[('svd', k)]:.2f}x as fast" for k in svd_kinds if k != "float32"))
            print()
        print(f"== goals ({load_line()} at end) ==")
        print("\n".join(goals))


if __name__ == "__main__":
    main()
