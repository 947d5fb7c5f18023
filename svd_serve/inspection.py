"""``svd-serve inspect``: what an adapter does to each weight, seen through singular values.

Per module: the singular values of ΔW (from its exact low-rank factors, no base needed), the
cumulative energy ``Σ_{i≤k} σ_i² / Σ σ²`` against rank k, the exported rank and its error; with
the base, also the spectra of ``W`` and ``W + ΔW`` and their difference ``Δσ_i = σ_i(W+ΔW) − σ_i(W)``,
reading the base one weight at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .adapter import AdapterSet
from .errors import SvdServeError
from .hub import resolve
from .linalg import exact_rank


@dataclass
class ModuleSpectrum:
    name: str
    shape: tuple[int, int]
    bound: int  # the method's rank bound
    delta_sigma: Tensor  # singular values of ΔW, descending (its exact rank of them are non-zero)
    rank: int  # exact rank of ΔW
    exported_rank: int  # rank written by export (= rank, or --max-rank)
    rel_error: float  # relative Frobenius error of the exported factors
    base_sigma: Tensor | None = None  # σ(W)
    adapted_sigma: Tensor | None = None  # σ(W + ΔW)

    @property
    def energy(self) -> Tensor:
        """Cumulative energy of ΔW: ``energy[k-1]`` is the share of ‖ΔW‖_F² in its top k components."""
        e = self.delta_sigma.double().square()
        total = e.sum()
        return (e.cumsum(0) / total).float() if total > 0 else torch.zeros_like(self.delta_sigma)

    def rank_for(self, share: float) -> int:
        """Smallest k whose top-k components hold ``share`` of ‖ΔW‖_F² (0 for a zero ΔW)."""
        e = self.energy
        return int((e < share - 1e-7).sum()) + 1 if float(e[-1]) > 0 else 0

    @property
    def norm(self) -> float:
        return float(self.delta_sigma.double().square().sum().sqrt())

    @property
    def dsigma(self) -> Tensor | None:
        return None if self.base_sigma is None else self.adapted_sigma - self.base_sigma


@torch.no_grad()
def inspect(adapter: str | Path, base: str | Path | None = None, max_rank: int | None = None,
            modules: str | None = None, revision: str | None = None) -> list[ModuleSpectrum]:
    """Spectra of every module of ``adapter`` (``modules``: a regex searched in module names);
    ``base``: a local directory or a Hugging Face Hub id at ``revision`` (:mod:`svd_serve.hub`)."""
    if max_rank is not None and max_rank < 1:
        raise SvdServeError("--max-rank must be at least 1")
    ckpt = None
    if base is not None:
        from .weights import Weights, return_freed_memory

        return_freed_memory()
        ckpt = Weights(resolve(base, revision).path)
    adapters = AdapterSet.load(adapter, ckpt)
    try:
        pattern = re.compile(modules) if modules else None
    except re.error as e:
        raise SvdServeError(f"bad --modules regex {modules!r}: {e}") from None
    layers = [(n, l) for n, l in adapters.items() if pattern is None or pattern.search(n)]
    if not layers:
        raise SvdServeError(f"--modules {modules!r} matches none of the adapter's {len(adapters.layers)} modules")
    deltas = adapters.deltas(max_rank)
    out = []
    for name, layer in layers:
        d = deltas[name]
        spec = ModuleSpectrum(name=name, shape=(layer.m, layer.n), bound=layer.rank_bound(),
                              delta_sigma=d.sigma, rank=exact_rank(d.sigma), exported_rank=d.rank,
                              rel_error=d.rel_error)
        if ckpt is not None:
            w = ckpt.weight(name).double()
            a, b = layer.delta()
            spec.base_sigma = torch.linalg.svdvals(w).float()
            spec.adapted_sigma = torch.linalg.svdvals(w + b.double() @ a.double()).float()
        out.append(spec)
    return out


def table(specs: list[ModuleSpectrum]) -> str:
    """A fixed-width text table, one row per module."""
    with_base = specs[0].base_sigma is not None
    head = ["module", "shape", "rank", "bound", "r@90%", "r@99%", "‖ΔW‖_F", "exported", "rel.err"]
    if with_base:
        head += ["‖ΔW‖/‖W‖", "σ1(W)", "σ1(W+ΔW)", "max|Δσ|"]
    rows = []
    for s in specs:
        row = [s.name, f"{s.shape[0]}x{s.shape[1]}", str(s.rank), str(s.bound), str(s.rank_for(0.9)),
               str(s.rank_for(0.99)), f"{s.norm:.4g}", str(s.exported_rank),
               "exact" if s.rel_error == 0 else f"{s.rel_error:.2e}"]
        if with_base:
            wnorm = float(s.base_sigma.double().square().sum().sqrt())
            row += [f"{s.norm / wnorm:.3e}", f"{float(s.base_sigma[0]):.4g}",
                    f"{float(s.adapted_sigma[0]):.4g}", f"{float(s.dsigma.abs().max()):.3e}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def plot(specs: list[ModuleSpectrum], path: str | Path, title: str = "", max_modules: int = 24) -> Path:
    """A PNG with one row of small panels per module: spectra of W and W+ΔW (with the base),
    Δσ (with the base), and ΔW's singular values with its cumulative energy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = check_plot_path(path)
    specs = specs[:max_modules]
    with_base = specs[0].base_sigma is not None
    cols = 3 if with_base else 1
    fig, axes = plt.subplots(len(specs), cols, figsize=(4.2 * cols + (1.0 if cols == 1 else 0), 2.3 * len(specs)),
                             squeeze=False, constrained_layout=True)
    for row, s in zip(axes, specs):
        short = _short(s.name)
        if with_base:
            ax = row[0]
            k = torch.arange(1, len(s.base_sigma) + 1)
            ax.semilogy(k.numpy(), s.base_sigma.clamp_min(1e-12).numpy(), color="0.45", lw=1.4, label="W")
            ax.semilogy(k.numpy(), s.adapted_sigma.clamp_min(1e-12).numpy(), color="C3", lw=1.0, ls="--", label="W+ΔW")
            ax.set_title(f"{short}: spectra", fontsize=9)
            ax.set_xlabel("index i", fontsize=8)
            ax.set_ylabel("σ_i", fontsize=8)
            ax.legend(fontsize=7, frameon=False)
            ax = row[1]
            ax.axhline(0, color="0.7", lw=0.8)
            ax.plot(k.numpy(), s.dsigma.numpy(), color="C0", lw=1.0, marker=".", ms=3)
            ax.set_title(f"{short}: Δσ_i = σ_i(W+ΔW) − σ_i(W)", fontsize=9)
            ax.set_xlabel("index i", fontsize=8)
        ax = row[-1]
        n = max(s.rank, 1)
        k = torch.arange(1, n + 1)
        ax.bar(k.numpy(), s.delta_sigma[:n].numpy(), color="C2", width=0.8, label="σ_i(ΔW)")
        ax.set_xlabel("rank k", fontsize=8)
        ax.set_ylabel("σ_i(ΔW)", fontsize=8, color="C2")
        tw = ax.twinx()
        tw.plot(k.numpy(), s.energy[:n].numpy(), color="C1", marker="o", ms=3, lw=1.2)
        tw.set_ylim(0, 1.05)
        tw.set_ylabel("cumulative energy", fontsize=8, color="C1")
        if s.exported_rank < s.rank:
            ax.axvline(s.exported_rank + 0.5, color="C3", ls=":", lw=1)
        err = "exact" if s.rel_error == 0 else f"err {s.rel_error:.1e}"
        ax.set_title(f"{short}: ΔW rank {s.rank}/{s.bound}, exported {s.exported_rank} ({err})", fontsize=9)
        for a in (*row, tw):
            a.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_plot_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SvdServeError(f"--plot must name a .png file, got {path.name}")
    if not path.parent.is_dir():
        raise SvdServeError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``L3.q_proj``."""
    m = re.search(r"(\d+)\.(?:[a-z_]+\.)*?([a-z_0-9]+)$", name)
    return f"L{m.group(1)}.{m.group(2)}" if m else name
