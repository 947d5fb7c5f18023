"""Training throughput of ``svd-serve train`` against HF PEFT + transformers ``Trainer`` at the same dtype.

    python bench/train_throughput.py                  # toy llama, KaSA and LoRA on all seven projections
    python bench/train_throughput.py --base "$(python scripts/smollm2.py)" --methods lora \\
        --dtype float32,bfloat16                      # SmolLM2-135M-Instruct, chat rows, q_proj,v_proj

The same rows in the same order, batch, steps, optimizer (fused AdamW, constant lr, clipping at
1.0), targets, rank and initial adapter (svd-serve's init is copied into PEFT's ``lora_A``/``lora_B``/
``lora_diag``) on both sides, and the same dtype: the base loaded in it, adapters float32 and autocast
around the forward for bfloat16 (PEFT keeps its adapters float32 on a bfloat16 base; the Trainer runs
with ``bf16=True``, and the run checks that its loss is computed under bfloat16 autocast: where the
Trainer does not enter it itself, as transformers 5.19 does not on the CPU, its ``compute_loss`` runs
inside ``torch.autocast("cpu", bfloat16)``, and the run says so). PEFT +
Trainer runs twice: padded batches, and padding-free with transformers' ``DataCollatorWithFlattening``
(each batch one row, position ids restarting per example; the run checks that the Trainer feeds it so).
For KaSA the Trainer's loss gets PEFT's KaSA regularizer averaged over layers, as svd-serve adds it;
KaSA also runs with ``--no-absorb-frozen``.

The Trainer runs as one would run it for speed: no evaluation, no saving, no logging (its losses are
kept from ``compute_loss``, detached, without a sync), dataloader workers 0. Every run is its own
process, one after another (peak RSS is its own), with ``--threads`` threads. A step's time is the
wall time from the end of the step before to the end of this one, on both sides: data, forward,
backward, clipping, the optimizer and whatever the loop records. Printed per run: seconds per step
and tokens/s (medians over the steps after ``--warmup``: robust to other load on the machine; the
ratios use them), peak RSS, the achieved FLOP/s and its fraction of the machine's GEMM peak for that
dtype, and the largest loss difference to svd-serve's curve (cross-entropy plus regularizer).

GEMM peak: measured in the same run, in its own process with the same threads, as the best rate of
``x Wᵀ`` and ``g W`` (a layer's forward and input gradient) over the model's distinct weight shapes
(the output head included) with 2048 rows. Useful FLOPs of a step, the same for every run: per
token, every frozen Linear's forward (2·in·out) and, where its input depends on an adapter, its
input gradient (2·in·out); each adapter's forward, weight gradients and input gradients; per
example and layer, causal attention (scores and weighted sum, 2·heads·head_dim·n(n+1) forward,
twice that backward where needed); the output head (forward and input gradient, 4·hidden·vocab) at
the positions that predict a target only. Nothing that a run chooses to compute beyond that (padding,
the head over every position, recomputation) counts.
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
ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
LR, SEED, MAX_LENGTH, GEMM_ROWS = 1e-3, 0, 128, 2048
GOAL_SPEED, GOAL_RSS, GOAL_BF16 = 1.3, 1.0, 1.3
PEFT_RUNS = {"peft-padded": "PEFT + Trainer, padded", "peft-flat": "PEFT + Trainer, flattened"}


def text_rows() -> list[dict]:
    from svd_serve.tiny import CORPUS

    base = sorted(set(CORPUS))
    return [{"text": " ".join(base[(i + j) % len(base)] for j in range(1 + i % 4))} for i in range(256)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def examples_of(spec: dict):
    from transformers import AutoTokenizer

    from svd_serve.dataset import encode, read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(spec["base"])
    return tokenizer, [encode(r, tokenizer, MAX_LENGTH) for r in read_jsonl(spec["data"])]


def step_ids(spec: dict, n: int) -> list[list[int]]:
    from svd_serve.training import global_batch

    return [global_batch(s, n, spec["batch"], SEED) for s in range(spec["steps"])]


# --- the runs (each in its own process) ---------------------------------------------------------------
def run_svd(spec: dict, absorb: bool = True) -> dict:
    """``svd_serve.training.train``; its freshly created adapter is saved (outside the timed loop) for PEFT."""
    import svd_serve.training as t
    from svd_serve.adapter import AdapterSet

    work = Path(spec["work"])
    create = AdapterSet.create

    def create_and_keep(*args, **kwargs):
        adapters = create(*args, **kwargs)
        adapters.save(work / f"init-{spec['method']}", overwrite=True)
        return adapters

    AdapterSet.create = create_and_keep
    out = work / f"svd-{spec['method']}-{spec['dtype']}-{absorb}"
    t.train(t.TrainConfig(base=spec["base"], data=spec["data"], out=str(out), method=spec["method"],
                          rank=spec["rank"], targets=spec["targets"], steps=spec["steps"], batch_size=spec["batch"],
                          lr=LR, schedule="constant", max_length=MAX_LENGTH, seed=SEED, absorb_frozen=absorb,
                          dtype=spec["dtype"], progress=False))
    records = [r for line in (out / "metrics.jsonl").open() if (r := json.loads(line))["step"] > 0]  # not the init check
    ends = [0.0] + [r["elapsed"] for r in records]  # the loop's clock starts right before step 1
    tokens = [0] + [r["tokens"] for r in records]
    return {"step_tokens": [b - a for a, b in zip(tokens, tokens[1:])],
            "step_seconds": [b - a for a, b in zip(ends, ends[1:])],
            "losses": [r["loss"] + r.get("reg", 0.0) for r in records], "peak_rss_mb": peak_rss_mb()}


def run_peft(spec: dict, flat: bool) -> dict:
    import torch
    from peft import KasaConfig, LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    from svd_serve.adapter import AdapterSet
    from svd_serve.dataset import collate
    from svd_serve.model import load_base
    from svd_serve.training import COMPUTE_DTYPES

    torch.manual_seed(SEED)
    work, method, bf16 = Path(spec["work"]), spec["method"], spec["dtype"] == "bfloat16"
    tokenizer, examples = examples_of(spec)
    order = [i for ids in step_ids(spec, len(examples)) for i in ids]  # svd-serve's order
    dataset = [examples[i] for i in order]
    if flat:
        dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in dataset]
        collator = DataCollatorWithFlattening()  # position ids restart per example; labels -100 at each start
    else:
        collator = lambda b: collate(b, tokenizer.pad_token_id)  # noqa: E731

    model = load_base(spec["base"], COMPUTE_DTYPES[spec["dtype"]])
    init = AdapterSet.load(work / f"init-{method}")
    config = LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0,
                        target_modules=spec["targets"].split(","),
                        kasa_config=KasaConfig() if method == "kasa" else None)
    model = get_peft_model(model, config)  # autocast_adapter_dtype: float32 adapters on a bfloat16 base
    kasa_layers = []
    with torch.no_grad():  # svd-serve's initial adapter, exactly
        for name, layer in init.items():
            module = model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(layer.A)
            module.lora_B["default"].weight.copy_(layer.B)
            if method == "kasa":
                module.lora_diag["default"].copy_(layer.d)
                kasa_layers.append(module)
    adapter_dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    seen = {}

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            own = bf16 and not torch.is_autocast_enabled("cpu")  # the Trainer's bf16=True skips it on the CPU
            if not seen:  # what the Trainer really feeds the model, and under which autocast
                seen.update(rows=inputs["input_ids"].shape[0], positions="position_ids" in inputs,
                            mask="attention_mask" in inputs, trainer_autocast=torch.is_autocast_enabled("cpu"))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=own):
                if "autocast" not in seen:
                    seen.update(autocast=torch.is_autocast_enabled("cpu"),
                                autocast_dtype=str(torch.get_autocast_dtype("cpu")))
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

    args = TrainingArguments(output_dir=str(work / "peft"), per_device_train_batch_size=spec["batch"],
                             max_steps=spec["steps"], learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=1.0, optim="adamw_torch_fused", logging_strategy="no",
                             save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=SEED,
                             disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, bf16=bf16)
    clock, losses = Clock(), []
    trainer = OrderedTrainer(model=model, args=args, train_dataset=dataset, callbacks=[clock], data_collator=collator)
    trainer.train()
    if flat and not (seen["rows"] == 1 and seen["positions"] and not seen["mask"]):
        raise RuntimeError(f"the Trainer did not feed flattened rows: {seen}")
    if seen["autocast"] != bf16 or (bf16 and "bfloat16" not in seen["autocast_dtype"]):
        raise RuntimeError(f"the Trainer's autocast is not the run's dtype {spec['dtype']}: {seen}")
    n = spec["batch"]
    return {"step_tokens": [sum(len(e.input_ids) for e in (examples[i] for i in order[s * n:(s + 1) * n]))
                            for s in range(spec["steps"])],
            "step_seconds": [b - a for a, b in zip(clock.ends, clock.ends[1:])],
            "losses": [x.item() for x in losses], "peak_rss_mb": peak_rss_mb(),
            "fed": seen, "adapter_dtypes": sorted(str(d) for d in adapter_dtypes)}


def run_gemm(spec: dict) -> dict:
    """The GEMM peak for the run's dtype, and every step's useful FLOPs (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from svd_serve.training import COMPUTE_DTYPES

    dtype = COMPUTE_DTYPES[spec["dtype"]]
    flops, shapes = useful_flops(spec)
    rates = {}
    for out_f, in_f in shapes:
        x, w = torch.randn(GEMM_ROWS, in_f, dtype=dtype), torch.randn(out_f, in_f, dtype=dtype)
        g = torch.randn(GEMM_ROWS, out_f, dtype=dtype)
        for name, fn in (("x Wt", lambda: F.linear(x, w)), ("g W", lambda: g @ w)):
            fn()
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            rates[f"{name} {out_f}x{in_f}"] = 2 * GEMM_ROWS * in_f * out_f / best
    return {"step_flops": flops, "gemm": rates}


def useful_flops(spec: dict) -> tuple[list[float], list[tuple[int, int]]]:
    """Per step, the useful FLOPs of its examples; and the model's distinct weight shapes. Which
    layers need an input gradient is read off one forward pass with an adapter of the run's rank on
    the run's targets (whether each Linear's input requires grad)."""
    import torch
    from torch import nn

    from svd_serve.adapter import AdapterSet, make_options
    from svd_serve.model import AdaptedLinear, load_base, resolve_targets

    tokenizer, examples = examples_of(spec)
    model = load_base(spec["base"])
    cfg = model.config
    head = model.get_output_embeddings()
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)})
    adapters = AdapterSet.create(model, "lora", make_options("lora", rank=spec["rank"]),
                                 resolve_targets(model, spec["targets"]), progress=False)
    model.requires_grad_(False)
    adapters.attach(model)
    per_token, attention = [0.0], []

    def linear_hook(mod, args):
        if mod is not head:
            per_token[0] += 2 * mod.in_features * mod.out_features * (1 + args[0].requires_grad)

    def adapter_hook(mod, args):
        r, m, n = mod.adapter.opts.rank, mod.out_features, mod.in_features
        # forward x A, (x A) B; gradients of A and B; of x A; of x where x needs one
        per_token[0] += 2 * r * (n + m) + 2 * r * (n + m) + 2 * r * m + 2 * r * n * args[0].requires_grad

    def attention_hook(mod, args, kwargs, out):
        attention.append(bool(out[0].requires_grad))

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_pre_hook(linear_hook))
        elif isinstance(mod, AdaptedLinear):
            hooks.append(mod.register_forward_pre_hook(adapter_hook))
        elif type(mod).__name__.endswith("Attention"):
            hooks.append(mod.register_forward_hook(attention_hook, with_kwargs=True))
    with torch.enable_grad():
        model(input_ids=torch.tensor([examples[0].input_ids[:8]]), use_cache=False)
    for h in hooks:
        h.remove()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    passes = sum(1 + 2 * needs_bwd for needs_bwd in attention)  # forward, plus backward (2x) where needed
    head_flops = 4 * head.in_features * head.out_features

    def example(e) -> float:
        n = len(e.input_ids)
        return n * per_token[0] + passes * 2 * heads * head_dim * n * (n + 1) / 2 * 2 + head_flops * e.n_targets

    return [sum(example(examples[i]) for i in ids) for ids in step_ids(spec, len(examples))], shapes


RUNNERS = {"svd": run_svd, "svd-no-absorb": lambda spec: run_svd(spec, absorb=False),
           "peft-padded": lambda spec: run_peft(spec, flat=False), "peft-flat": lambda spec: run_peft(spec, flat=True),
           "gemm": run_gemm}


# --- the report --------------------------------------------------------------------------------------
def median_after(values: list[float], warmup: int) -> float:
    return statistics.median(values[warmup:])


def summary(run: dict, flops: list[float], warmup: int) -> dict:
    sec, tok = run["step_seconds"][warmup:], run["step_tokens"][warmup:]
    fl = flops[warmup:len(run["step_seconds"])]
    return {"s_step": statistics.median(sec), "tok_s": statistics.median(n / t for n, t in zip(tok, sec)),
            "flop_s": statistics.median(f / t for f, t in zip(fl, sec)), "rss": run["peak_rss_mb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help=BASE_HELP)
    p.add_argument("--data", help="JSONL rows (default: text rows on the toy, short chat rows with --base)")
    p.add_argument("--methods", default="kasa,lora")
    p.add_argument("--targets", help=f"default: {ALL_PROJECTIONS} on the toy, q_proj,v_proj with --base")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or both (comma list)")
    p.add_argument("--steps", type=int, help="default: 100 on the toy, 30 with --base")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the figures")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--peft", default="padded,flat", help="PEFT + Trainer runs: padded, flat or both")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:  # one run in this process; the result as the last stdout line
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(RUNNERS[a.worker](json.loads(Path(a.spec).read_text()))))
        return

    dtypes = a.dtype.split(",")
    peft_runs = [f"peft-{k}" for k in a.peft.split(",")]
    steps = a.steps or (30 if a.base else 100)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, what = base_model(a.base, work, **TOY)
        data = Path(a.data) if a.data else write_jsonl(work / "data.jsonl", chat_rows() if a.base else text_rows())
        targets = a.targets or ("q_proj,v_proj" if a.base else ALL_PROJECTIONS)
        import torch

        print(f"model: {what}\ndata: {data.name if a.data else ('chat rows' if a.base else 'text rows')}; "
              f"rank {a.rank} on {targets}; batch {a.batch_size}, {steps} steps (figures: medians over steps "
              f"{a.warmup + 1}-{steps}); CPU, {a.threads} threads; torch {torch.__version__}; {load_line()} at start\n")

        def worker(runner: str, spec: dict) -> dict:
            (work / "spec.json").write_text(json.dumps(spec))
            cmd = [sys.executable, __file__, "--worker", runner, "--spec", str(work / "spec.json"),
                   "--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{runner} {spec.get('method', '')} {spec['dtype']} failed:\n{proc.stderr[-3000:]}")
            return json.loads(proc.stdout.strip().splitlines()[-1])

        results = {}
        for dtype in dtypes:
            spec = dict(base=str(base), data=str(data), work=str(work), targets=targets, rank=a.rank, steps=steps,
                        batch=a.batch_size, dtype=dtype)
            gemm = worker("gemm", {**spec, "method": "lora"})
            peak = max(gemm["gemm"].values())
            print(f"== {dtype}: GEMM peak {peak / 1e9:.0f} GFLOP/s ({max(gemm['gemm'], key=gemm['gemm'].get)}, "
                  f"{GEMM_ROWS} rows); useful work {statistics.mean(gemm['step_flops']) / 1e9:.1f} GFLOP per step ==")
            print(f"{'method':8s} {'run':28s} {'s/step':>7s} {'tok/s':>7s} {'x PEFT pad':>10s} {'x PEFT flat':>11s} "
                  f"{'RSS MB':>7s} {'RSS/PEFT':>8s} {'GFLOP/s':>8s} {'% peak':>7s} {'max|dloss|':>10s}")
            for method in a.methods.split(","):
                runners = ["svd"] + (["svd-no-absorb"] if method != "lora" else []) + peft_runs
                runs = {r: worker(r, {**spec, "method": method}) for r in runners}  # svd first: it writes the init
                sums = {r: summary(run, gemm["step_flops"], a.warmup) for r, run in runs.items()}
                best_peft = max(peft_runs, key=lambda r: sums[r]["tok_s"])
                for r, s in sums.items():
                    label = {"svd": "svd-serve", "svd-no-absorb": "svd-serve --no-absorb-frozen", **PEFT_RUNS}[r]
                    ratio = lambda q: f"{s['tok_s'] / sums[q]['tok_s']:.2f}" if q in sums else "-"  # noqa: E731
                    gap = max(abs(x - y) for x, y in zip(runs[r]["losses"], runs["svd"]["losses"]))
                    print(f"{method:8s} {label:28s} {s['s_step']:7.3f} {s['tok_s']:7.0f} {ratio('peft-padded'):>10s} "
                          f"{ratio('peft-flat'):>11s} {s['rss']:7.0f} {s['rss'] / sums[best_peft]['rss']:8.2f} "
                          f"{s['flop_s'] / 1e9:8.1f} {100 * s['flop_s'] / peak:6.1f}% {gap:10.2e}")
                fed = runs.get("peft-flat", {}).get("fed")
                if fed:
                    print(f"{'':8s} (flattened: the Trainer fed {fed['rows']} row per batch with position ids, "
                          f"no attention mask; autocast {fed['autocast']})")
                if dtype != "float32" and not runs[best_peft]["fed"]["trainer_autocast"]:
                    print(f"{'':8s} (the Trainer's bf16=True did not autocast on the CPU; the bench wrapped its "
                          f"compute_loss in torch.autocast)")
                results[(dtype, method)] = (sums, best_peft, runs)
            print()

        print(f"== goals ({load_line()} at end) ==")
        for (dtype, method), (sums, best_peft, runs) in results.items():
            s, q = sums["svd"], sums[best_peft]
            speed, rss = s["tok_s"] / q["tok_s"], s["rss"] / q["rss"]
            print(f"{dtype} {method}: svd-serve {speed:.2f}x the faster PEFT + Trainer ({PEFT_RUNS[best_peft]}), "
                  f"peak RSS {rss:.2f}x its -> {'met' if speed >= GOAL_SPEED and rss <= GOAL_RSS else 'NOT met'} "
                  f"(goal >= {GOAL_SPEED}x at <= {GOAL_RSS}x memory)")
        if {"float32", "bfloat16"} <= set(dtypes):
            for method in a.methods.split(","):
                f32, bf16 = results[("float32", method)][0], results[("bfloat16", method)][0]
                for r in ["svd", *peft_runs]:
                    gain = f32[r]["s_step"] / bf16[r]["s_step"]
                    name = "svd-serve" if r == "svd" else PEFT_RUNS[r]
                    verdict = f" -> {'met' if gain >= GOAL_BF16 else 'NOT met'} (goal >= {GOAL_BF16}x)" if r == "svd" else ""
                    print(f"bfloat16 step vs float32, {method}, {name}: {gain:.2f}x faster{verdict}")
        for (dtype, method), (_, _, runs) in results.items():
            print(f"\n{dtype} {method} loss (cross-entropy + regularizer): svd-serve | "
                  + " | ".join(PEFT_RUNS[r] for r in peft_runs))
            curve = runs["svd"]["losses"]
            for i in range(0, len(curve), max(1, len(curve) // 6)):
                print(f"  step {i + 1:4d}  {curve[i]:.4f} | " + " | ".join(f"{runs[r]['losses'][i]:.4f}" for r in peft_runs))


if __name__ == "__main__":
    main()
