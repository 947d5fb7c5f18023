"""``svd-serve demo``: the whole path on a tiny model, in a few minutes on a laptop CPU.

base → train a KaSA adapter → answers before and after → fold → export to every registered target
(PEFT, vLLM, ONNX, ...) with a numerical check of each → a summary of where everything is.

The default base is the embedded ``svd_serve/data/tiny-knowledge``: a 1M-parameter Llama pretrained
on biographies of 300 made-up people (``bench/knowledge``). The task asks questions about half of
them; the answers shown are for the OTHER half, so a right answer means the adapter taught the
model to retrieve facts it stored in pretraining, not to recite training data.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

from .errors import SvdServeError
from .files import check_writable
from .methods import DEFAULT_METHOD

EMBEDDED = Path(__file__).parent / "data" / "tiny-knowledge"


def task(out: Path) -> tuple[Path, Path, list[dict], list[dict]]:
    """(base, train.jsonl, held-out rows, rows to show). Without the embedded base, a random tiny
    Llama and an addition task stand in (answers are then shown on training prompts)."""
    from .dataset import read_jsonl

    if (EMBEDDED / "demo_train.jsonl").is_file():
        test = read_jsonl(EMBEDDED / "demo_test.jsonl")
        return EMBEDDED, EMBEDDED / "demo_train.jsonl", test, test[:: max(1, len(test) // 6)][:6]
    from .tiny import build_tiny_model

    base = out / "base"
    if not (base / "config.json").is_file():
        build_tiny_model(base, "llama")
    rows = [{"prompt": f"Question: what is {a} plus {b}? Answer:", "completion": f" {a + b}"}
            for a in range(6) for b in range(6)]
    data = out / "data" / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, data, rows, rows[::7]


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 6) -> str:
    """Greedy decoding until end of sequence or end of line."""
    ids = tokenizer(prompt)["input_ids"]
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
        tok = int(logits.argmax())
        if tok == tokenizer.eos_token_id:
            break
        new.append(tok)
        if "\n" in tokenizer.decode(new):
            break
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0]


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], batch_size: int = 64) -> float:
    """Share of rows whose completion the model predicts token for token (teacher-forced argmax,
    which equals greedy decoding of the completion)."""
    from .dataset import IGNORE, collate, encode

    hits = 0
    for i in range(0, len(rows), batch_size):
        batch = collate([encode(r, tokenizer, 128) for r in rows[i:i + batch_size]], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        mask = (labels != IGNORE) & (labels != tokenizer.eos_token_id)
        ok = (logits[:, :-1].argmax(-1) == labels) | ~mask
        hits += int(ok.all(dim=1).sum())
    return hits / len(rows)


def demo(out: str | Path = "svd-serve-demo", steps: int = 300, method: str = DEFAULT_METHOD, lr: float = 2e-3,
         log=print, serve_check: bool = True) -> dict:
    """Run the demo into ``out``; returns the summary that is also written to ``out/summary.json``.
    Engine output (ONNX model builder, vLLM) goes to the log file (see :mod:`svd_serve.log`); the
    demo ends with a table of every step, its check and where its output is."""
    from transformers import AutoTokenizer

    from .model import load_base

    out = _prepare_out(Path(out), steps)
    t0 = time.time()
    base, data, test, shown = task(out)
    log(f"base: {base}")
    tokenizer, model = AutoTokenizer.from_pretrained(base), load_base(base)
    before, answers_before = _measure(model, tokenizer, test, shown)
    adapter = _train_adapter(base, data, out, method, steps, lr, log)
    _attach(adapter, model)
    after, answers_after = _measure(model, tokenizer, test, shown)
    _log_answers(shown, answers_before, answers_after, log)
    folded, fold_gap = _fold(base, adapter, out, model, tokenizer, shown[0]["prompt"])
    exports = _export_all(base, adapter, out, log)
    if serve_check:
        _serve_vllm_export(base, exports, shown, log)
    summary = {"base": str(base), "method": method, "steps": steps, "adapter": str(adapter),
               "accuracy_before": before, "accuracy_after": after, "eval_rows": len(test),
               "folded": str(folded), "fold_max_logit_gap": fold_gap, "exports": exports,
               "answers": _answers(shown, answers_before, answers_after), "seconds": round(time.time() - t0, 1)}
    _write_summary(summary, out, "held-out" if base == EMBEDDED else "training", log)
    return summary


def _prepare_out(out: Path, steps: int) -> Path:
    """Check the arguments and create ``out``: empty, new, or an earlier demo's output."""
    if steps < 1:
        raise SvdServeError("--steps must be at least 1")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "summary.json").is_file())):
        raise SvdServeError(f"{out} exists and is not an earlier demo's output; choose another --out")
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _measure(model, tokenizer, test: list[dict], shown: list[dict]) -> tuple[float, list[str]]:
    """Exact match on the held-out rows, and the answers to the rows shown."""
    return exact_match(model, tokenizer, test), [generate(model, tokenizer, r["prompt"]) for r in shown]


def _train_adapter(base: Path, data: Path, out: Path, method: str, steps: int, lr: float, log) -> Path:
    from .methods import get_method
    from .training import TrainConfig, train

    log(f"training a {method} adapter ({steps} steps) on {data}")
    return train(TrainConfig(base=str(base), data=str(data), out=str(out / f"{method}-adapter"),
                             method=method, targets="all-linear", steps=steps, lr=lr, batch_size=16,
                             calib_data=str(data) if get_method(method).needs_calibration else None,
                             overwrite=True))


def _attach(adapter: Path, model) -> None:
    from .adapter import AdapterSet

    AdapterSet.load(adapter, model).attach(model)


def _log_answers(shown: list[dict], before: list[str], after: list[str], log) -> None:
    """The answers before and after training, one question a line."""
    log("")
    log(f"{'question':56s} {'expected':10s} {'before':12s} after")
    for r, b, a in zip(shown, before, after):
        q = r["prompt"].replace("\n", " ")
        log(f"{q[:56]:56s} {r['completion'].strip():10s} {b.strip()[:12]:12s} {a.strip()}")
    log("")


def _fold(base: Path, adapter: Path, out: Path, model, tokenizer, prompt: str) -> tuple[Path, float]:
    """Fold the adapter into ``out/folded`` and compare its logits with base + adapter (``model``)."""
    from .fold import fold
    from .model import load_base

    folded = fold(base, adapter, out / "folded", overwrite=True)  # a rerun replaces its own outputs
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits
        fold_gap = float((load_base(folded)(input_ids=ids).logits - adapted_logits).abs().max())
    return folded, fold_gap


def _export_all(base: Path, adapter: Path, out: Path, log) -> dict:
    """Export to every registered target: each one's report, or the first line of its error."""
    from .converters import TARGETS
    from .export import export

    exports = {}
    for target in TARGETS:
        log(f"exporting to {target} ...")
        try:
            report = export(target, base, [adapter], out / "export" / target, overwrite=True)
        except Exception as e:  # one target's missing runtime must not hide the others
            exports[target] = {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}
            continue
        entry = report["adapters"][Path(adapter).name]
        exports[target] = {"out": report["out"], **{k: v for k, v in entry.items() if isinstance(v, (int, float, str))}}
    return exports


def _serve_vllm_export(base: Path, exports: dict, shown: list[dict], log) -> None:
    """Serve the vLLM export with vLLM, where it was written and vLLM is installed."""
    if "out" not in exports.get("vllm", {}) or not importlib.util.find_spec("vllm"):
        return
    from .verify import verify

    log("serving the vLLM export with vLLM (float32, base and adapter in one batch) ...")
    exports["vllm"]["served"] = verify("vllm", base, exports["vllm"]["out"], [r["prompt"] for r in shown],
                                       max_new_tokens=8).checks


def _answers(shown: list[dict], before: list[str], after: list[str]) -> list[dict]:
    return [{"prompt": r["prompt"], "expected": r["completion"].strip(), "before": b.strip(), "after": a.strip()}
            for r, b, a in zip(shown, before, after)]


def _write_summary(summary: dict, out: Path, held: str, log) -> None:
    """Write ``out/summary.json`` and log the table of steps."""
    from . import log as logs

    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log("")
    for line in summary_table(summary, held, out / "summary.json"):
        log(line)
    if not logs.verbose():
        log(f"(engine logs: {logs.log_path()})")


def summary_table(summary: dict, held: str, where: Path) -> list[str]:
    """One row per step of the demo: what ran, its check, where its output is."""
    rows = [(f"train {summary['method']} ({summary['steps']} steps)",
             f"exact match on {summary['eval_rows']} {held} questions: {summary['accuracy_before']:.1%} before, "
             f"{summary['accuracy_after']:.1%} after", summary["adapter"]),
            ("folded checkpoint", f"logits vs base + adapter: max |Δ| {summary['fold_max_logit_gap']:.1e}",
             summary["folded"])]
    for target, e in summary["exports"].items():
        if "error" in e:
            rows.append((f"export {target}", f"FAILED: {e['error']}", ""))
            continue
        err = e["max_rel_error"]
        check = (f"rank {e['rank']} (≤ {e['bound']}), {'exact' if err == 0 else f'rel. error {err:.1e}'}, "
                 f"logits vs adapted model: max |Δ| {e.get('max_logit_gap', float('nan')):.1e}")
        rows.append((f"export {target}", check, e["out"]))
        if "onnx_max_logit_gap" in e:
            rows.append(("  ONNX Runtime session", f"{e['provider']}: logits vs adapted model: max |Δ| "
                                                  f"{e['onnx_max_logit_gap']:.1e}", ""))
        for name, c in e.get("served", {}).items():
            rows.append((f"  served by vLLM: {name}", f"greedy tokens {'match' if c['tokens_match'] else 'DIFFER'}, "
                                                      f"max |Δ logprob| {c['max_logprob_gap']:.1e}", ""))
    rows.append(("summary", f"{summary['seconds']:.0f} s", str(where)))
    rows.insert(0, ("step", "check", "output"))
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    line = "─" * (w0 + w1 + 4 + max(len(r[2]) for r in rows))
    text = [f"{a:{w0}s}  {b:{w1}s}  {c}".rstrip() for a, b, c in rows]
    return [line, text[0], line, *text[1:], line]
