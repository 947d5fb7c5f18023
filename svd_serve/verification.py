"""What every target's ``verify`` (``svd-serve verify --target T``, :mod:`svd_serve.verify`) is made of:
the reference run of the Hugging Face model with the exported factors applied (:func:`prepare`,
:func:`greedy`), the comparison of a runtime's greedy tokens and logprobs with it (:func:`compare`),
one report format (:class:`Verification`, :func:`report`), and quiet runtimes whose failures are one
line (:func:`engine`).

Before any runtime starts, the base given is checked against the fingerprint the export recorded
(:func:`check_fingerprint`): an export checked on another base would compare two wrong models and
find them equal. The targets import these pieces; :mod:`svd_serve.verify` only dispatches to them.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import SvdServeError
from .linalg import LowRank
from .model import LowRankDelta, attach, detach, fingerprint, linear_names, load_base

PROMPTS = ["The quick brown fox", "Paris is the capital of", "Question: what is two plus two? Answer:"]
BASE = "(base)"
# the largest |Δ logprob| accepted by default, by the dtype the runtime computes in
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}

Runs = dict[str, list[tuple[list[int], list[float]]]]  # name -> per prompt (greedy tokens, their logprobs)


@dataclass
class VerifyOptions:
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    max_new_tokens: int = 16
    tol: float | None = None  # largest accepted |Δ logprob|; None: TOLERANCE of the runtime's dtype
    kv_cache_mib: int = 1024  # vLLM's KV cache

    def __post_init__(self):
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise SvdServeError("--prompt must be a non-empty text")
        if self.max_new_tokens < 1:
            raise SvdServeError("--max-new-tokens must be at least 1")
        if self.tol is not None and not (math.isfinite(self.tol) and self.tol >= 0):
            raise SvdServeError("--tol must be a finite number >= 0")
        if self.kv_cache_mib < 1:
            raise SvdServeError("--kv-cache-mib must be at least 1")


@dataclass
class Verification:
    """One report format for every target: a row per name (the base, each adapter)."""

    target: str
    runtime: str  # what ran the export
    reference: str  # what it was compared with
    tol: float
    prompts: int
    max_new_tokens: int
    checks: dict[str, dict]  # name -> {tokens_match, prompts_matched, near_ties, max_logprob_gap, ok, tokens}
    log: str | None = None  # where the runtime's output went

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def lines(self) -> list[str]:
        """The summary table."""
        width = max(len(n) for n in [*self.checks, "name"])
        out = [f"verify --target {self.target}: {self.runtime} against {self.reference}",
               f"{self.prompts} prompts x {self.max_new_tokens} new tokens, greedy; "
               f"accepted max |Δ logprob| {self.tol:.1e}", "",
               f"{'name':{width}s}  {'greedy tokens':17s}  {'max |Δ logprob|':15s}  result"]
        for name, c in self.checks.items():
            tokens = f"{c['prompts_matched']}/{self.prompts} match" + (f", {c['near_ties']} tie" if c.get("near_ties") else "")
            out.append(f"{name:{width}s}  {tokens:17s}  {c['max_logprob_gap']:<15.2e}  {'ok' if c['ok'] else 'MISMATCH'}")
        if self.log:
            out.append(f"{self.target} runtime output: {self.log}")
        bad = [n for n, c in self.checks.items() if not c["ok"]]
        ties = sum(c.get("near_ties", 0) for c in self.checks.values())
        out.append(f"MISMATCH: {', '.join(bad)}" if bad else f"all {len(self.checks)} match"
                   + (f" ({ties} prompt(s) part at a near tie of the reference)" if ties else ""))
        return out


# --- shared steps -------------------------------------------------------------------------------------
TOP_K = 8  # the reference's best tokens kept per step, to judge a divergence


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float], list[dict]]:
    """Greedy tokens, their logprobs (log-softmax of the raw logits) and, per step, the ``TOP_K`` best
    tokens with their logprobs; with a KV cache."""
    tokens, logprobs, tops = [], [], []
    inputs, past = torch.tensor([ids]), None
    for _ in range(max_new_tokens):
        out = model(input_ids=inputs, past_key_values=past, use_cache=True)
        lp = torch.log_softmax(out.logits[0, -1].float(), -1)
        best = lp.topk(min(TOP_K, lp.numel()))
        tok = int(best.indices[0])
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        tops.append(dict(zip(best.indices.tolist(), best.values.tolist())))
        inputs, past = torch.tensor([[tok]]), out.past_key_values
    return tokens, logprobs, tops


def compare(ref: list[tuple], got: list[tuple], tol: float) -> dict:
    """Per prompt: the runtime's greedy tokens ``got`` against the reference's ``ref`` (tokens,
    logprobs and, from :func:`greedy`, each step's best tokens), and the largest logprob gap over the
    common prefix. Where the tokens part, the prompt still passes as a near tie when the runtime's
    token is among the reference's best and within ``tol`` of its top logprob there (two tokens that
    close may swap under any rounding; what follows a different token is not compared)."""
    matched, ties, gap = 0, 0, 0.0
    for r, g in zip(ref, got, strict=True):
        (rt, rl), (gt, gl), tops = r[:2], g[:2], (r[2] if len(r) > 2 else None)
        n = next((i for i, (a, b) in enumerate(zip(rt, gt)) if a != b), min(len(rt), len(gt)))
        gap = max([gap, *(abs(rl[i] - gl[i]) for i in range(n))])
        if rt == gt:
            matched += 1
        elif tops and n < min(len(rt), len(gt)) and gt[n] in tops[n] and tops[n][rt[n]] - tops[n][gt[n]] <= tol:
            ties += 1
    ok = matched + ties == len(ref) and gap <= tol
    return {"tokens_match": matched == len(ref), "prompts_matched": matched, "near_ties": ties,
            "max_logprob_gap": gap, "ok": ok}


def check_fingerprint(model: torch.nn.Module, modules: list[str] | None, recorded: str | None,
                      what: str, base: str | Path) -> None:
    """Refuse a base whose weights are not the ones ``what`` was made for (``modules`` None: every Linear)."""
    if not recorded:
        raise SvdServeError(f"{what} records no base fingerprint: it cannot be checked; export it again")
    names = linear_names(model) if modules is None else modules
    missing = [m for m in names if m not in dict(model.named_modules())]
    if missing:
        raise SvdServeError(f"{what} adapts module {missing[0]}, which {base} lacks: it was made for another base")
    fp = fingerprint(model, names)
    if fp != recorded:
        raise SvdServeError(f"{what} was made for another base: its base fingerprint {recorded} differs "
                            f"from {fp} of {base}")


def checked_base(base: str | Path, fingerprints: list[tuple[str, str | None, list[str] | None]],
                 prompts: list[str]) -> tuple[torch.nn.Module, list[list[int]]]:
    """The base loaded in float32 and checked against every recorded fingerprint ``(what,
    fingerprint, modules)``, and the token ids of ``prompts``: what every reference starts from."""
    from transformers import AutoTokenizer

    model = load_base(base)
    for what, recorded, modules in fingerprints:
        check_fingerprint(model, modules, recorded, what, base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise SvdServeError(f"cannot load the tokenizer of {base}: {str(e).splitlines()[0]}") from None
    return model, [tokenizer(p)["input_ids"] for p in prompts]


def prepare(base: str | Path, factors: dict[str, dict[str, LowRank]],
            fingerprints: list[tuple[str, str | None, list[str] | None]], options: VerifyOptions,
            ) -> tuple[torch.nn.Module, list[list[int]], Runs]:
    """Load the base (float32), check it against every recorded fingerprint ``(what, fingerprint,
    modules)``, tokenize the prompts and run the reference: the base alone and with each adapter's
    ``factors``. Returns ``(model, prompt ids, reference runs)``."""
    model, ids = checked_base(base, fingerprints, options.prompts)
    ref: Runs = {BASE: [greedy(model, i, options.max_new_tokens) for i in ids]}
    for name, deltas in factors.items():
        attach(model, {m: LowRankDelta(f.A, f.B) for m, f in deltas.items()})
        try:
            ref[name] = [greedy(model, i, options.max_new_tokens) for i in ids]
        finally:
            detach(model)
    return model, ids, ref


def report(target: str, runtime: str, ref: Runs, got: Runs, options: VerifyOptions, dtype: str = "float32",
           log: Path | None = None, reference: str = "the Hugging Face model with the exported factors") -> Verification:
    tol = options.tol if options.tol is not None else TOLERANCE[dtype]
    checks = {name: {**compare(ref[name], got[name], tol), "tokens": [r[0] for r in got[name]]} for name in ref}
    return Verification(target, runtime, reference, tol, len(options.prompts), options.max_new_tokens, checks,
                        str(log) if log else None)


_ERROR_LINE = re.compile(r"\b([A-Z]\w*(?:Error|Exception)): (\S.*)$")


def root_cause(text: str) -> str | None:
    """The first ``SomeError: message`` line of a runtime's output (the root cause comes first)."""
    for line in text.splitlines():
        match = _ERROR_LINE.search(line)
        if match:
            return f"{match[1]}: {match[2].strip()}"
    return None


@contextlib.contextmanager
def engine(what: str):
    """Run a runtime quietly (:func:`svd_serve.log.quiet`): its output goes to the log file, whose path
    is yielded (None with ``-v``); any failure but an :class:`SvdServeError` becomes one
    :class:`SvdServeError` with the root cause found in the output and the log's path."""
    from . import log

    path = log.log_path()
    start = path.stat().st_size if not log.verbose() and path.is_file() else 0
    with log.quiet(what) as logged:
        try:
            yield logged
        except SvdServeError:
            raise
        except Exception as e:
            cause = None
            if logged is not None:
                with open(logged, errors="replace") as f:
                    f.seek(start)
                    cause = root_cause(f.read())
            first = str(e).splitlines()[0] if str(e) else ""
            cause = cause or f"{type(e).__name__}{': ' + first if first else ''}"
            where = f"; its output is in {logged}" if logged else "; see its output above"
            raise SvdServeError(f"{what} failed: {cause}{where}") from None
