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
from .converters import TARGETS
from .demo import demo
from .errors import SvdServeError
from .merge import METHODS as MERGE_METHODS
from .methods import METHODS
from .train import DTYPES, SCHEDULES, TrainConfig
from .verify import TOLERANCE, VerifyOptions

TRAIN = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # the defaults of `train`
DEMO = {k: p.default for k, p in inspect.signature(demo).parameters.items()}  # and of `demo`
TARGETS_HELP = "Module-name suffixes (comma list), 'all-linear', or a regex over full names."
OVERWRITE_HELP = "Replace an earlier svd-serve output at --out (never other files)."


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
@click.option("--base", type=click.Path(), help="Hugging Face model directory.  [required]")
@click.option("--data", type=click.Path(), help='JSONL: {"text"}, {"prompt","completion"} or {"messages"}.  [required]')
@click.option("--out", type=click.Path(), help="Output directory: the adapter, metrics.jsonl, loss.png, checkpoints/.  [required]")
@click.option("--method", default=TRAIN["method"], type=click.Choice(list(METHODS)),
              help="Adapter method (see `svd-serve methods`).")
@click.option("--rank", type=int, help="Adapter rank r, the same as -o rank=R (default: the method's).")
@click.option("--alpha", type=float, help="LoRA alpha, scale = alpha / r, the same as -o alpha=A; only methods "
                                          "with a scale take it (default: the method's).")
@click.option("--targets", default=TRAIN["targets"], help=TARGETS_HELP)
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="A method option, parsed by its type, e.g. -o ratio=0.2 (repeat). `svd-serve methods` lists "
                   "each method's options; an option the method does not have is refused.")
@click.option("--reg", multiple=True, metavar="KEY=VALUE",
              help="A regularizer weight, e.g. --reg beta=1e-3: the same as -o, for regularizer weights only.")
@click.option("--calib-data", type=click.Path(), help="JSONL for the input covariances of CorDA and KORE.")
@click.option("--max-length", default=TRAIN["max_length"], type=int, help="Longer rows are truncated (and counted).")
@click.option("--pack", is_flag=True, help="Concatenate short rows into rows of up to --max-length tokens.")
@click.option("--eval-data", type=click.Path(), help="JSONL evaluated at checkpoints and at the end.")
@click.option("--eval-split", type=float, help="Hold out this fraction of --data for evaluation, e.g. 0.05.")
@click.option("--eval-every", type=int, help="Evaluate every N steps (default: at checkpoints and the end).")
@click.option("--steps", type=int, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=float, help="Epochs over the data (instead of --steps).")
@click.option("--batch-size", default=TRAIN["batch_size"], type=int, help="Rows per process and accumulation step.")
@click.option("--grad-accum", default=TRAIN["grad_accum"], type=int, help="Accumulation steps per optimizer step.")
@click.option("--lr", default=TRAIN["lr"], type=float, help="Peak learning rate of AdamW.")
@click.option("--schedule", default=TRAIN["schedule"], type=click.Choice(SCHEDULES), help="Decay after warmup.")
@click.option("--warmup", default=TRAIN["warmup"], type=float, help="Warmup steps (>= 1) or fraction of all steps (< 1).")
@click.option("--weight-decay", default=TRAIN["weight_decay"], type=float, help="AdamW weight decay.")
@click.option("--max-grad-norm", default=TRAIN["max_grad_norm"], type=float, help="Clip the global gradient norm (0: off).")
@click.option("--dtype", default=TRAIN["dtype"], type=click.Choice(list(DTYPES)),
              help="Compute dtype of the base: float32, or bfloat16 (half the memory; autocast). Adapter "
                   "parameters stay float32. float16 is not offered: it would need loss scaling.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--absorb-frozen/--no-absorb-frozen", default=TRAIN["absorb_frozen"],
              help="Fold the frozen low-rank terms (KaSA, PiSSA, ...) into the run's base copy: faster steps.")
@click.option("--max-init-loss-increase", default=str(TRAIN["max_init_loss_increase"]), metavar="NATS",
              help="Refuse to train when the adapter at init raises the loss (on a few eval or training rows) "
                   "by more than this many nats; 0, inf or off: never refuse (the check is still shown and "
                   "recorded).")
@click.option("--seed", default=TRAIN["seed"], type=int, help="Seed of the adapter init, the data order and --eval-split.")
@click.option("--save-every", type=int, help="Checkpoint to OUT/checkpoints/step-N every N steps.")
@click.option("--keep-checkpoints", default=TRAIN["keep_checkpoints"], type=int,
              help="Keep the last N checkpoints (and the best).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in OUT/checkpoints.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run at --out (its own files only).")
@click.option("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available, else cpu).")
@click.option("--no-progress", "progress", flag_value=False, default=TRAIN["progress"], help="No progress bar.")
@click.pass_context
def train(ctx, config_file, **given):
    """Train an adapter; the method's regularizers are added automatically.

    Under `torchrun --nproc-per-node N -m svd_serve train ...` it trains data-parallel (NCCL on GPU,
    gloo on CPU); --batch-size is per process."""
    from click.core import ParameterSource

    from .train import load_config
    from .train import train as run

    # a config file's values are overridden only by flags given on the command line
    given = {k: v for k, v in given.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    for key in ("options", "reg"):
        if key in given:
            given[key] = list(given[key])
    click.echo(f"adapter written to {run(load_config(config_file, **given))}")


@cli.command()
@click.option("--base", required=True, type=click.Path(), help="The base the adapter was trained on.")
@click.option("--adapter", required=True, type=click.Path(), help="svd-serve adapter directory.")
@click.option("--out", required=True, type=click.Path(), help="Output HF checkpoint directory.")
@click.option("--max-shard-size", help="Shard the output at this size, e.g. 5GB (default: the base's shards).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def fold(base, adapter, out, max_shard_size, overwrite):
    """Fold an adapter into the base: a standalone HF checkpoint in the base's own dtype, written one
    tensor at a time."""
    from .fold import fold as run

    click.echo(f"folded checkpoint written to {run(base, adapter, out, max_shard_size, overwrite)}")


@cli.command()
@click.option("--target", required=True, type=click.Choice(list(TARGETS)), help="Where the adapters will be served.")
@click.option("--base", required=True, type=click.Path(), help="The base the adapters were trained on.")
@click.option("--adapter", "adapters", required=True, multiple=True, type=click.Path(),
              help="svd-serve adapter directory (repeat for several).")
@click.option("--out", required=True, type=click.Path(), help="Output directory.")
@click.option("--max-rank", type=int, help="Best rank-K approximation instead of the exact rank (error reported).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="--target onnx: the graph's dtype, float32 (CPU) or float16 (CUDA); default float16 where "
                   "CUDAExecutionProvider is available, else float32. Other targets write float32 factors.")
@click.option("--no-verify", is_flag=True, help="Skip the numerical checks of the written adapter.")
@click.option("--check-logits/--no-check-logits", default=None,
              help="Also compare logits of the float32 base with the written factors and the adapted "
                   "model (loads the model; default: on for checkpoints up to 256 MiB).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def export(target, base, adapters, out, max_rank, dtype, no_verify, check_logits, overwrite):
    """Export adapters as exact LoRA against the unmodified base."""
    from .export import export as run

    extra = {"dtype": dtype} if dtype else {}
    report = run(target, base, list(adapters), out, max_rank=max_rank, verify=not no_verify,
                 check_logits=check_logits, overwrite=overwrite, **extra)
    for name, entry in report["adapters"].items():
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
    for line in report.get("messages", []):
        click.echo(line)
    click.echo(f"written to {out}")


@cli.command("inspect")
@click.option("--adapter", required=True, type=click.Path(), help="svd-serve adapter directory.")
@click.option("--base", type=click.Path(), help="The base: adds the spectra of W and W+ΔW, and Δσ.")
@click.option("--max-rank", type=int, help="Show the export at this rank (error reported).")
@click.option("--modules", help="Regex: only the modules whose names it matches.")
@click.option("--plot", type=click.Path(), help="Also write the spectra as a PNG (a grid of small panels).")
def inspect_cmd(adapter, base, max_rank, modules, plot):
    """Singular spectra per module: ΔW's rank and energy, and with --base the σ shift of W."""
    from .inspect import check_plot_path, inspect, plot as draw, table

    if plot:
        check_plot_path(plot)
    specs = inspect(adapter, base, max_rank=max_rank, modules=modules)
    click.echo(table(specs))
    if plot:
        draw(specs, plot, title=str(adapter))
        shown = f" (first 24 of {len(specs)} modules; narrow with --modules)" if len(specs) > 24 else ""
        click.echo(f"plot written to {plot}{shown}")


@cli.command()
@click.option("--target", required=True, type=click.Choice(list(TARGETS)),
              help="The target the export was written for; it runs in that target's runtime.")
@click.option("--base", required=True, type=click.Path(), help="The base the export was made for (a local directory).")
@click.option("--export", "export_dir", required=True, type=click.Path(), help="Output of `svd-serve export`.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeat; default: three built-in).")
@click.option("--max-new-tokens", default=VerifyOptions.max_new_tokens, show_default=True, type=int,
              help="Greedy tokens generated per prompt.")
@click.option("--max-tokens", "max_tokens_alias", type=int, hidden=True)
@click.option("--tol", type=float, help="Largest accepted |Δ logprob| (default: "
              + ", ".join(f"{v:g} for {k}" for k, v in TOLERANCE.items()) + " runtimes).")
@click.option("--kv-cache-mib", default=VerifyOptions.kv_cache_mib, show_default=True, type=int,
              help="vLLM's KV cache size.")
@click.option("--json", "json_out", type=click.Path(), help="Also write the report (with tokens) here.")
def verify(target, base, export_dir, prompts, max_new_tokens, max_tokens_alias, tol, kv_cache_mib, json_out):
    """Run an export in its target's runtime (vLLM, ONNX Runtime, PEFT) and compare greedy tokens and
    logprobs with the Hugging Face model, for the base and every adapter. Exit status 1 on a mismatch."""
    from .verify import verify as run

    if max_tokens_alias is not None:
        max_new_tokens = max_tokens_alias
    result = run(target, base, export_dir, list(prompts) or None, max_new_tokens, tol, kv_cache_mib)
    if json_out:
        from .io import atomic_write_text

        atomic_write_text(json_out, json.dumps(result.to_dict(), indent=2) + "\n")
    for line in result.lines():
        click.echo(line)
    if not result.ok:
        sys.exit(1)


@cli.command()
@click.option("--base", required=True, type=click.Path(), help="The base every adapter was trained on.")
@click.option("--adapter", "adapters", required=True, multiple=True, type=click.Path(),
              help="svd-serve adapter directory (repeat for each).")
@click.option("--method", required=True, type=click.Choice(MERGE_METHODS), help="Merge method.")
@click.option("--weights", help="Comma list, one per adapter (default: all 1).")
@click.option("--density", default=1.0, show_default=True, type=float,
              help="TIES/KnOTS: fraction of magnitudes kept; DARE: keep probability.")
@click.option("--lambda", "lam", default=1.0, show_default=True, type=float, help="Scale of the merged ΔW.")
@click.option("--seed", default=0, show_default=True, type=int, help="DARE's random masks.")
@click.option("--shared", default="ties", show_default=True, type=click.Choice(MERGE_METHODS[:-1]),
              help="twin: the method of the shared merge.")
@click.option("--fold", is_flag=True, help="Write a merged HF checkpoint.")
@click.option("--max-rank", type=int, help="Write one adapter of rank <= K (twin: each task adapter).")
@click.option("--rank", "old_rank", type=int, hidden=True)
@click.option("--out", required=True, type=click.Path(), help="Output directory.")
@click.option("--max-shard-size", help="--fold/twin: shard the checkpoint at this size, e.g. 5GB (default: the base's shards).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def merge(base, adapters, method, weights, density, lam, seed, shared, fold, max_rank, old_rank, out, max_shard_size,
          overwrite):
    """Merge adapters of one base: a folded checkpoint, one adapter, or (twin) a new base plus
    one residual adapter per task, OUT/base and OUT/adapters/NAME."""
    from .merge import merge as run

    max_rank = one_of("--max-rank", max_rank, "--rank", old_rank)
    if weights is not None:
        try:
            weights = [float(w) for w in weights.split(",")]
        except ValueError:
            raise SvdServeError(f"--weights {weights!r} is not a comma list of numbers") from None
    report = run(base, list(adapters), out, method, weights=weights, density=density, lam=lam,
                 seed=seed, fold=fold, rank=max_rank, shared=shared, max_shard_size=max_shard_size,
                 overwrite=overwrite)
    if report["kind"] == "adapter":
        click.echo(f"rank {report['rank']}, max relative error {report['max_rel_error']:.3e}")
    for name, entry in report.get("adapters", {}).items():
        click.echo(f"{name}: rank {entry['rank']}, max relative error {entry['max_rel_error']:.3e}")
    click.echo(f"{method} merge of {len(adapters)} adapters ({report['modules']} modules) written to {out}")


class _UnlistedArgument(click.Argument):
    """A positional argument kept for old command lines, left out of the usage line."""

    def get_usage_pieces(self, ctx):
        return []


@cli.command("import")
@click.option("--from", "source", required=True, type=click.Choice(["peft"]), help="The adapter's format.")
@click.option("--adapter", type=click.Path(), help="The adapter directory to import.  [required]")
@click.option("--base", required=True, type=click.Path(), help="The original, unmodified base.")
@click.option("--initial", type=click.Path(),
              help="PiSSA/OLoRA/CorDA: the adapter PEFT saved before training.")
@click.option("--out", required=True, type=click.Path(), help="Output directory (a native adapter).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.argument("old_adapter", required=False, type=click.Path(), cls=_UnlistedArgument)
def import_cmd(source, adapter, base, initial, out, overwrite, old_adapter):
    """Import a PEFT LoRA / PiSSA / OLoRA / CorDA / KaSA adapter as an exact native adapter."""
    from .importer import import_peft

    adapter = one_of("--adapter", adapter, "a positional path", old_adapter)
    if adapter is None:
        raise SvdServeError("missing --adapter (the PEFT adapter directory)")
    report = import_peft(adapter, base, out, initial, overwrite)
    click.echo(f"{report['kind']} adapter, {report['modules']} modules, rank {report['rank']}, written to {out}")


@cli.command()
@click.option("--base", required=True, type=click.Path(), help="The base the fine-tune started from.")
@click.option("--finetuned", required=True, type=click.Path(), help="A full fine-tune of --base.")
@click.option("--max-rank", type=int, help="Components kept per module.")
@click.option("--rank", "old_rank", type=int, hidden=True)
@click.option("--energy", type=float, help="Per module, the fewest components holding this fraction of ||ΔW||².")
@click.option("--targets", default="all-linear", show_default=True, help=TARGETS_HELP)
@click.option("--out", required=True, type=click.Path(), help="Output directory (a native adapter).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def extract(base, finetuned, max_rank, old_rank, energy, targets, out, overwrite):
    """Extract an adapter from a full fine-tune (SVD of W_ft - W_base per Linear)."""
    from .extract import extract as run

    report = run(base, finetuned, out, rank=one_of("--max-rank", max_rank, "--rank", old_rank), energy=energy,
                 targets=targets, overwrite=overwrite)
    click.echo(f"{report['modules']} modules, rank {report['rank']}, max relative error "
               f"{report['max_rel_error']:.3e}" + (f", {report['unchanged']} unchanged modules left out"
                                                    if report["unchanged"] else ""))
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
        msg = str(e).splitlines()[0] if str(e) else ""
        click.echo(f"error: {type(e).__name__}: {msg} (set SVD_SERVE_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
