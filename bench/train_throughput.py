"""Training throughput of ``svd-serve train`` against HF PEFT + transformers ``Trainer``.

    python bench/train_throughput.py                  # KaSA and LoRA, 100 steps each
    python bench/train_throughput.py --steps 20 --methods lora

KaSA also runs with ``--no-absorb-frozen`` (its frozen term as a second low-rank product per layer
instead of folded into the run's private base copy, as PEFT's KaSA rewrites its base).

One locally built llama (a few million parameters, float32, CPU), the same text rows in the same
order, the same batch, steps, optimizer (fused AdamW, constant lr, clipping at 1.0), targets and
initial adapter (svd-serve's init is copied into PEFT's ``lora_A``/``lora_B``/``lora_diag``). For KaSA
the Trainer's loss gets PEFT's KaSA regularizer averaged over layers, as svd-serve adds it.

The Trainer runs as one would run it for speed: no evaluation, no saving, no logging (its losses are
kept from ``compute_loss``, detached, without a sync), dataloader workers 0. Both sides use 2 threads.

Every run is its own process, one after another, so that peak RSS is its own. A step's time is the
wall time from the end of the step before to the end of this one, on both sides: data loading and
collation, forward, backward, clipping, the optimizer and whatever the loop records. Printed:
tokens/s (the median over steps, after the first ``--warmup`` steps, of a step's non-padding tokens
over its time: robust to other load on the machine; and the mean, all measured tokens over all their
time), peak RSS, their ratios, and both loss curves (cross-entropy plus regularizer), which must agree
up to float32 noise.
"""

from __future__ import annotations

import argparse
import functools
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

MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, LR, SEED = 8, 1e-3, 0


def make_data(path: Path) -> None:
    from svd_serve.tiny import CORPUS

    base = sorted(set(CORPUS))
    rows = [{"text": " ".join(base[(i + j) % len(base)] for j in range(1 + i % 4))} for i in range(256)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_svd(model: Path, data: Path, work: Path, method: str, steps: int, batch: int, absorb: bool = True) -> dict:
    """``svd_serve.train.train``; its freshly created adapter is saved (outside the timed loop) for PEFT."""
    import svd_serve.train as t

    create = t.AdapterSet.create

    def create_and_keep(*args, **kwargs):
        adapters = create(*args, **kwargs)
        adapters.save(work / f"init-{method}")
        return adapters

    t.AdapterSet.create = create_and_keep
    out = work / f"svd-{method}-{absorb}"
    t.train(t.TrainConfig(base=str(model), data=str(data), out=str(out), method=method, rank=RANK,
                          targets=",".join(TARGETS), steps=steps, batch_size=batch, lr=LR, schedule="constant",
                          max_length=128, seed=SEED, absorb_frozen=absorb, progress=False))
    records = [r for line in (out / "metrics.jsonl").open() if (r := json.loads(line))["step"] > 0]  # not the init check
    ends = [0.0] + [r["elapsed"] for r in records]  # the loop's clock starts right before step 1
    tokens = [0] + [r["tokens"] for r in records]
    return {"step_tokens": [b - a for a, b in zip(tokens, tokens[1:])],
            "step_seconds": [b - a for a, b in zip(ends, ends[1:])],
            "losses": [r["loss"] + r.get("reg", 0.0) for r in records], "peak_rss_mb": peak_rss_mb()}


def run_peft(model_dir: Path, data: Path, work: Path, method: str, steps: int, batch: int) -> dict:
    import torch
    from peft import KasaConfig, LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from svd_serve.adapter import AdapterSet
    from svd_serve.data import collate, encode, read_jsonl
    from svd_serve.model import load_base
    from svd_serve.train import global_batch

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [encode(r, tokenizer, 128) for r in read_jsonl(data)]
    order = [i for s in range(steps) for i in global_batch(s, len(examples), batch, SEED)]  # svd-serve's order
    dataset = [examples[i] for i in order]

    model = load_base(model_dir)
    init = AdapterSet.load(work / f"init-{method}")
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS,
                        kasa_config=KasaConfig() if method == "kasa" else None)
    model = get_peft_model(model, config)
    kasa_layers = []
    with torch.no_grad():  # svd-serve's initial adapter, exactly
        for name, layer in init.items():
            module = model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(layer.A)
            module.lora_B["default"].weight.copy_(layer.B)
            if method == "kasa":
                module.lora_diag["default"].copy_(layer.d)
                kasa_layers.append(module)

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if kasa_layers:  # PEFT sums the regularizer over layers; svd-serve averages it
                loss = loss + model.base_model._get_kasa_loss() / len(kasa_layers)
            losses.append(loss.detach())
            return loss

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.ends = [time.perf_counter()]

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(work / f"peft-{method}"), per_device_train_batch_size=batch,
                             max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=1.0, optim="adamw_torch_fused", logging_strategy="no",
                             save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=SEED,
                             disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)
    clock, losses = Clock(), []
    trainer = OrderedTrainer(model=model, args=args, train_dataset=dataset, callbacks=[clock],
                             data_collator=lambda b: collate(b, tokenizer.pad_token_id))
    trainer.train()
    return {"step_tokens": [sum(len(e.input_ids) for e in dataset[i * batch:(i + 1) * batch]) for i in range(steps)],
            "step_seconds": [b - a for a, b in zip(clock.ends, clock.ends[1:])],
            "losses": [x.item() for x in losses], "peak_rss_mb": peak_rss_mb()}


def throughput(run: dict, warmup: int) -> tuple[float, float]:
    """Median and mean tokens/s over the steps after the first ``warmup``."""
    tokens, seconds = run["step_tokens"][warmup:], run["step_seconds"][warmup:]
    return statistics.median(n / t for n, t in zip(tokens, seconds)), sum(tokens) / sum(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5, help="First steps left out of the tokens/s figures.")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--methods", default="kasa,lora")
    p.add_argument("--worker", nargs=2, metavar=("RUNNER", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:  # one run in this process; the result as the last stdout line
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
        work = Path(a.work)
        runner, method = a.worker
        fn = {"svd": run_svd, "svd-no-absorb": functools.partial(run_svd, absorb=False), "peft": run_peft}[runner]
        print(json.dumps(fn(work / "model", work / "data.jsonl", work, method, a.steps, a.batch_size)))
        return

    from svd_serve.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "model", "llama", **MODEL)
        make_data(work / "data.jsonl")
        n_params = sum(v.numel() for v in __import__("safetensors.torch").torch.load_file(
            model / "model.safetensors").values())
        print(f"model: llama {MODEL}, {n_params / 1e6:.1f}M parameters, float32, CPU, "
              f"{min(2, os.cpu_count() or 1)} threads; rank {RANK} on {','.join(TARGETS)}; "
              f"batch {a.batch_size}, {a.steps} steps (tokens/s over steps {a.warmup + 1}-{a.steps})\n")
        print(f"{'method':24s} {'svd-serve tok/s':>16s} {'PEFT tok/s':>11s} {'ratio':>6s} {'(mean)':>7s} "
              f"{'svd-serve RSS MB':>17s} {'PEFT RSS MB':>12s} {'ratio':>6s} {'max |Δ loss|':>13s}")
        curves = {}
        for method in a.methods.split(","):
            res = {}
            runners = ["svd", "peft"] + (["svd-no-absorb"] if method != "lora" else [])
            for runner in runners:  # svd first: it writes the initial adapter PEFT starts from
                cmd = [sys.executable, __file__, "--worker", runner, method, "--work", str(work),
                       "--steps", str(a.steps), "--batch-size", str(a.batch_size)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{runner} {method} failed:\n{proc.stderr[-3000:]}")
                res[runner] = json.loads(proc.stdout.strip().splitlines()[-1])
            q = res["peft"]
            tq, mq = throughput(q, a.warmup)
            for runner in [r for r in runners if r != "peft"]:
                s = res[runner]
                ts, ms = throughput(s, a.warmup)
                gap = max(abs(x - y) for x, y in zip(s["losses"], q["losses"]))
                label = method + (" --no-absorb-frozen" if runner == "svd-no-absorb" else "")
                print(f"{label:24s} {ts:16.0f} {tq:11.0f} {ts / tq:6.2f} {ms / mq:7.2f} {s['peak_rss_mb']:17.0f} "
                      f"{q['peak_rss_mb']:12.0f} {s['peak_rss_mb'] / q['peak_rss_mb']:6.2f} {gap:13.2e}")
            curves[method] = (res["svd"]["losses"], q["losses"])
        for method, (s, q) in curves.items():
            print(f"\n{method} loss (cross-entropy + regularizer), svd-serve | PEFT + Trainer:")
            for i in range(0, len(s), max(1, len(s) // 10)):
                print(f"  step {i + 1:4d}  {s[i]:.4f} | {q[i]:.4f}")


if __name__ == "__main__":
    main()
