"""``svd-serve verify --url URL``: check a running OpenAI-compatible server (vLLM, or any server that
returns token ids and logprobs) against the Hugging Face model with exactly the factors it serves.

For the base and each adapter (by its served name), greedy completions of the prompt token ids with
their logprobs are compared with the reference as the offline verify does (:func:`verify.compare`),
in the same table and JSON. All requests are sent at once, so the server mixes base and adapter
requests in its batches as it does under load. Each mismatching row is classified: an adapter whose
answers equal the server's base answers while its reference differs is *silently ignored*; a base
row that mismatches means the server does not serve the base the adapters were made for, unless
every differing answer is one of the adapters' (base requests that got an adapter applied).

``--adapter NAME=DIR`` maps a served name to a native adapter (``svd_adapter.json``, converted the
way the vLLM plugin converts it, :meth:`ExportedAdapter.from_adapter`), a PEFT export
(``adapter_config.json``) or an adapter of a vLLM export (``serve.json``); ``--export DIR`` adds every
adapter of a vLLM export under its own name.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import SvdServeError
from .linalg import LowRank
from .verification import BASE, TOLERANCE, Runs, Verification, VerifyOptions, compare, prepare

REQUEST_TIMEOUT = 300  # seconds per request (a CPU server under load is slow)
IN_FLIGHT = 16  # requests sent at once

Fingerprint = tuple[str, str | None, list[str] | None]  # (what, recorded fingerprint, modules)


@dataclass
class ServerVerification(Verification):
    """:class:`Verification` of a server: each row's ``result`` and ``why`` name what went wrong."""

    url: str = ""
    tol_source: str = ""

    def lines(self) -> list[str]:
        out = super().lines()
        out[0] = f"verify --url {self.url}: {self.runtime} against {self.reference}"
        out[1] += f" ({self.tol_source})"
        for i, c in enumerate(self.checks.values()):
            if c["result"] not in ("ok", "mismatch"):
                out[4 + i] = out[4 + i].removesuffix("MISMATCH") + f"MISMATCH: {c['result']}"
        notes = [f"{name}: {c['why']}" for name, c in self.checks.items() if c.get("why")]
        return out[:-1] + notes + out[-1:]


# --- what is checked -----------------------------------------------------------------------------------
def parse_adapters(pairs: list[str]) -> dict[str, Path]:
    """``["NAME=DIR", ...]`` → served name → directory."""
    out: dict[str, Path] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise SvdServeError(f"--adapter {pair!r}: give NAME=DIR (the served name, then the adapter or export)")
        if name in out:
            raise SvdServeError(f"--adapter {name} is given twice")
        if not Path(path).is_dir():
            raise SvdServeError(f"--adapter {name}={path}: directory not found")
        out[name] = Path(path)
    return out


def export_adapters(export_dir: str | Path) -> dict[str, Path]:
    """Every adapter of a vLLM export, by its name."""
    from .converters.vllm import read_serve

    export_dir = Path(export_dir)
    return {n: export_dir / n if (export_dir / n).is_dir() else Path(a["path"])
            for n, a in read_serve(export_dir)["adapters"].items()}


def adapter_factors(name: str, path: Path) -> tuple[dict[str, LowRank], Fingerprint]:
    """The exact factors the server applies for ``name`` served from ``path``, and the fingerprint of
    the base they were made for."""
    from .converters.peft import CONFIG, read_lora, read_record
    from .converters.vllm import SERVE

    what = f"adapter {name} ({path})"
    if (path / SERVE).is_file():
        adapters = export_adapters(path)
        if name not in adapters:
            raise SvdServeError(f"--adapter {name}={path}: {path} is a vLLM export of {', '.join(adapters)}, not "
                                f"of {name}: give {path}/<adapter>, or --export {path} to check each by its name")
        path = adapters[name]
    if (path / "svd_adapter.json").is_file():
        from .adapter import AdapterSet
        from .converters import ExportedAdapter

        adapters = AdapterSet.load(path)
        exported = ExportedAdapter.from_adapter(name, path, adapters)  # as the vLLM plugin converts it
        factors = {m: LowRank(exported.A[m], exported.B[m]) for m in exported.A}
        return factors, (what, adapters.config.base_fingerprint, list(adapters.config.targets))
    if (path / CONFIG).is_file():
        factors = read_lora(path)
        return factors, (what, read_record(path)["base_fingerprint"], list(factors))
    raise SvdServeError(f"--adapter {name}={path}: not an adapter (no svd_adapter.json, {CONFIG} or {SERVE})")


# --- the server ----------------------------------------------------------------------------------------
class Server:
    """The few OpenAI API calls verify needs, over plain HTTP; every failure is one :class:`SvdServeError`."""

    def __init__(self, url: str, api_key: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise SvdServeError(f"--url {url}: give an http:// or https:// address, e.g. http://127.0.0.1:8000")
        self.url = url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key

    def call(self, path: str, body: dict | None, what: str) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data, headers)
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            message = error_message(e)
            if e.code == 404:
                raise SvdServeError(f"the server does not serve {what} (404{': ' + message if message else ''})") from None
            raise SvdServeError(f"the server answered {e.code} for {what}{': ' + message if message else ''}") from None
        except (urllib.error.URLError, OSError) as e:  # refused, unknown host, timed out
            reason = getattr(e, "reason", e)
            raise SvdServeError(f"cannot reach {self.url}: {reason}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            answer = None
        if not isinstance(answer, dict):
            raise SvdServeError(f"{self.url}{path} did not answer a JSON object: is it an OpenAI-compatible server?")
        return answer

    def base_name(self) -> tuple[str, str]:
        """The served name of the base (the one listed model that is not an adapter) and its owner."""
        listed = self.call("/v1/models", None, "/v1/models").get("data")
        if not isinstance(listed, list):
            raise SvdServeError(f"{self.url}/v1/models lists no models: is it an OpenAI-compatible server?")
        bases = [m for m in listed if isinstance(m, dict) and not m.get("parent")]
        if len(bases) != 1:
            names = ", ".join(str(m.get("id")) for m in bases) or "none"
            raise SvdServeError(f"cannot tell which model {self.url} serves as the base (listed: {names}): "
                                "give --served-base-name")
        return str(bases[0].get("id")), str(bases[0].get("owned_by") or "OpenAI-compatible")

    def complete(self, model: str, ids: list[int], max_tokens: int, what: str) -> tuple[list[int], list[float]]:
        """Greedy tokens and their logprobs for the prompt token ids ``ids``."""
        body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 1,
                "ignore_eos": True, "return_token_ids": True, "return_tokens_as_token_ids": True}
        answer = self.call("/v1/completions", body, what)
        try:
            choice = answer["choices"][0]
            logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
            tokens = choice.get("token_ids")
            if tokens is None:  # "token_id:N" strings, with return_tokens_as_token_ids
                tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
            tokens = [int(t) for t in tokens]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise SvdServeError(f"the server's answer for {what} has no token ids with logprobs: verify needs "
                                "both (vLLM returns them)") from None
        if len(tokens) != len(logprobs):
            raise SvdServeError(f"the server's answer for {what} has {len(tokens)} tokens but {len(logprobs)} logprobs")
        return tokens, logprobs


def error_message(e: urllib.error.HTTPError) -> str:
    """The server's one-line reason for an HTTP error (OpenAI form ``{"error": {"message"}}``)."""
    try:
        body = json.loads(e.read() or b"{}")
        message = body.get("error", body)
        message = message.get("message", "") if isinstance(message, dict) else str(message)
    except (ValueError, AttributeError, OSError):
        message = ""
    message = str(message).strip().splitlines()[0] if str(message).strip() else ""
    return message[:300]


def run_server(server: Server, names: dict[str, str], prompt_ids: list[list[int]], max_tokens: int) -> Runs:
    """Every (row, prompt) request at once; ``names``: row → served model name."""
    jobs = [(row, model, ids) for row, model in names.items() for ids in prompt_ids]
    got: Runs = {row: [] for row in names}
    with ThreadPoolExecutor(min(IN_FLIGHT, len(jobs))) as pool:
        futures = [pool.submit(server.complete, model, ids, max_tokens,
                               "the base model " + repr(model) if row == BASE else f"adapter {model}")
                   for row, model, ids in jobs]
        try:
            for (row, _, _), future in zip(jobs, futures):
                got[row].append(future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return got


# --- judging -------------------------------------------------------------------------------------------
def classify(ref: Runs, got: Runs, checks: dict[str, dict], tol: float, base: str) -> None:
    """Set each row's ``result`` (ok, mismatch, silently ignored, not the adapters' base, adapter applied
    to base requests) and ``why`` (None, or one sentence) from :func:`compare`'s ``checks``."""
    def tokens(runs: Runs, name: str) -> list[list[int]]:
        return [r[0] for r in runs[name]]

    for name, c in checks.items():
        c["result"], c["why"] = ("ok", None) if c["ok"] else ("mismatch", None)
        if not c["ok"] and c["prompts_matched"] + c["near_ties"] == len(ref[name]):
            c["why"] = (f"the tokens match but logprobs differ by up to {c['max_logprob_gap']:.1e} > {tol:.1e}: "
                        "a server in another dtype? (--dtype or --tol)")
    adapters = [n for n in checks if n != BASE]
    b = checks[BASE]
    if not b["ok"] and b["why"] is None:
        differ = [i for i in range(len(ref[BASE])) if not compare([ref[BASE][i]], [got[BASE][i]], tol)["ok"]]
        carried = {i: [n for n in adapters if tokens(ref, n)[i] == tokens(got, BASE)[i]] for i in differ}
        if carried and all(carried.values()):
            which = sorted({n for ns in carried.values() for n in ns})
            b["result"] = "adapter applied to base requests"
            b["why"] = (f"on {len(differ)} of {len(ref[BASE])} prompts the server's base answers are those of "
                        f"adapter {', '.join(which)}: base requests got an adapter applied (vLLM's CPU backend does "
                        "this in mixed batches, vllm-project/vllm#48421)")
        else:
            b["result"] = "not the adapters' base"
            b["why"] = (f"the server's base answers differ from those of {base}: the server does not serve "
                        "the base the adapters were made for")
    for name in adapters:
        c = checks[name]
        if (not c["ok"] and tokens(got, name) == tokens(got, BASE) and tokens(ref, name) != tokens(ref, BASE)):
            c["result"] = "silently ignored"
            c["why"] = ("the server's answers equal its base answers on every prompt while the reference's differ: "
                        "the server does not apply the adapter")


def verify_url(url: str, base: str | Path, adapters: dict[str, Path], options: VerifyOptions,
               dtype: str | None = None, served_base_name: str | None = None,
               api_key: str | None = None, revision: str | None = None) -> ServerVerification:
    """Check the server at ``url`` for its base and each adapter of ``adapters`` (served name → the
    adapter or export it serves) against the Hugging Face model on ``base`` (a local directory or a
    Hugging Face Hub id at ``revision``, :mod:`svd_serve.hub`) with the same factors."""
    from .hub import resolve
    from .weights import check_base_dir

    server = Server(url, api_key)
    if BASE in adapters:
        raise SvdServeError(f"{BASE} cannot be an adapter's served name")
    base = check_base_dir(resolve(base, revision).path)
    read = {name: adapter_factors(name, path) for name, path in adapters.items()}
    base_name, owner = (served_base_name, "OpenAI-compatible") if served_base_name else server.base_name()
    if base_name in adapters:
        raise SvdServeError(f"{base_name} is the server's base, not an adapter: drop --adapter {base_name}=...")
    _, ids, ref = prepare(base, {n: f for n, (f, _) in read.items()}, [fp for _, fp in read.values()], options)
    got = run_server(server, {BASE: base_name, **{n: n for n in adapters}}, ids, options.max_new_tokens)
    tol = options.tol if options.tol is not None else TOLERANCE[dtype or "float32"]
    source = ("--tol" if options.tol is not None else f"--dtype {dtype}" if dtype
              else "float32; the server's dtype is not known to the client: --dtype or --tol for another")
    checks = {name: {**compare(ref[name], got[name], tol), "tokens": [r[0] for r in got[name]]} for name in ref}
    classify(ref, got, checks, tol, str(base))
    return ServerVerification("url", f"{owner} server, base model {base_name!r}, all requests at once",
                              "the Hugging Face model with the exact factors", tol, len(options.prompts),
                              options.max_new_tokens, checks, None, server.url, source)
