"""Whole-model serving speed of 2:4 sparse Llama-shaped models against dense ones, with CUDA graphs (CUDA only).

For Llama-3.2-1B and Llama-3-8B shapes (random weights with 2:4 zeros in every decoder linear; the real
weights do not fit the device machine's transfer limit) it times, side by side in one run and each with
the same CUDA-graph capture (``nmperm_plugin.export.GraphRunner``):

- **prefill** (batch x tokens, default 1x2048, 4x2048, 1x8192; logits of the last position) and
- **decode** (one new token for batch 1, 8, 64 against a KV cache of ``--context`` positions),

for four variants: dense bf16; 2:4 bf16 (``sparsify_(SemiSparseWeightConfig())``, then tuned
``CusparseltLinear`` layers: cuSPARSELt called directly, algorithm chosen once per shape, fused transposed
result); FP8 dense (torchao ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``); FP8 2:4
(``sparsify_(Float8SemiSparseWeightConfig())``, torchao's CUTLASS sm90 kernel, SM 9.x). Medians of CUDA-event
timings of graph replays, tokens/s, and every variant's logits compared with dense bf16's. A per-linear table
follows (the same variants on each decoder linear shape, graph-captured, plus eager dense and eager
``SparseSemiStructuredTensor`` to show the per-call floor). ``--check-model DIR`` converts a pruned
checkpoint with ``nmperm_plugin.export`` and checks its greedy tokens against the unconverted model.

    python bench/serve_speed.py                      # both models: bench/results/serve_speed-*.json and .md
    python bench/serve_speed.py --models llama-3.2-1b --no-linear
    python bench/serve_speed.py --check-model out/smollm2-24 --skip-bench

Goal (issue 18): 2:4 at least 1.3x dense at the same precision for prefill of 2048 tokens or more, and decode
at least 0.95x; the summary says met or missed per row. Exit status: 0 when every variant's outputs agree with
dense within tolerance (and the model check, if run, gives the same tokens in bf16/fp16), 1 otherwise, 2
without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import write_pair  # noqa: E402

MODELS = {  # Llama-3.2-1B and Llama-3-8B (config.json of the released models)
    "llama-3.2-1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256),
    "llama-3-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
}
VARIANTS = ("dense_bf16", "sparse_bf16", "fp8_dense", "fp8_sparse")
PAIRS = (("sparse_bf16", "dense_bf16"), ("fp8_sparse", "fp8_dense"))  # (2:4, dense at the same precision)
TOLERANCE = {"sparse_bf16": 5e-2, "fp8_dense": 0.25, "fp8_sparse": 0.25}  # relative L2 error of logits vs dense bf16
GOAL = {"prefill": 1.3, "decode": 0.95, "prefill_min_tokens": 2048}
LINEAR_TOKENS = (1, 8, 64, 2048, 8192)
HIDDEN = {"llama-3.2-1b": 2048, "llama-3-8b": 4096}
TOKENS = (1, 16, 256, 4096)  # gather-norm token counts (--norms)
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"
NO_CUDA = (
    "serve_speed.py: no CUDA GPU found; CUDA graphs and the 2:4 sparse kernels (cuSPARSELt, CUTLASS) run only on "
    "CUDA, so nothing was measured"
)


def shape_arg(text: str) -> tuple[int, int]:
    """``"4x2048"`` -> ``(4, 2048)`` for argparse."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if match is None or min(int(match.group(1)), int(match.group(2))) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxTOKENS (e.g. 4x2048)")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--prefill", nargs="+", type=shape_arg, default=[(1, 2048), (4, 2048), (1, 8192)])
    parser.add_argument("--decode", nargs="+", type=int, default=[1, 8, 64], help="decode batch sizes")
    parser.add_argument("--context", type=int, default=512, help="KV-cache positions before the decoded token")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--tune", choices=("time", "search", "off"), default="time", help="cuSPARSELt alg choice")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--eager", action="store_true", help="also time every model variant without graphs")
    parser.add_argument("--linear-tokens", nargs="+", type=int, default=list(LINEAR_TOKENS))
    parser.add_argument("--no-linear", action="store_true", help="skip the per-linear table")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model table")
    parser.add_argument("--norms", action="store_true", help="also time the fold: gather norm against RMSNorm")
    parser.add_argument("--no-compile", action="store_true", help="--norms: skip the torch.compile'd norms")
    parser.add_argument("--skip-bench", action="store_true", help="only run --check-model")
    parser.add_argument("--check-model", type=Path, default=None, help="pruned checkpoint for the greedy check")
    parser.add_argument("--check-dtype", choices=("bf16", "fp16", "fp8"), default="bf16")
    parser.add_argument("--check-backend", choices=("cusparselt", "cutlass"), default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the result files")
    args = parser.parse_args(argv)
    if min(args.decode + args.linear_tokens) < 1 or args.context < 1:
        parser.error("--decode, --linear-tokens and --context must be positive")
    return args


# --- timing -------------------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` on the GPU in milliseconds (CUDA events, after ``warmup`` calls)."""
    from nmperm_plugin.export.serving import median_cuda_ms

    return median_cuda_ms(fn, repeats, warmup)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 error ``||actual - expected|| / ||expected||``."""
    actual, expected = actual.float().cpu(), expected.float().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


# --- a Llama-shaped decoder with a static KV cache --------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Block(nn.Module):
    """One Llama decoder layer: RMSNorm, GQA attention with RoPE (SDPA), RMSNorm, SwiGLU MLP."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        hidden, self.heads, self.kv_heads = spec["hidden"], spec["heads"], spec["kv_heads"]
        self.head_dim = hidden // self.heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(hidden, eps=1e-5), nn.RMSNorm(hidden, eps=1e-5)
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, spec["intermediate"], bias=False)
        self.up_proj = nn.Linear(hidden, spec["intermediate"], bias=False)
        self.down_proj = nn.Linear(spec["intermediate"], hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, pos: int = 0):
        batch, tokens, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        group = self.heads // self.kv_heads
        if cache is None:  # prefill: repeat K/V per query head (cheap next to the matmuls), causal flash attention
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # decode one token: write its K/V, then attend to every cached position (no mask for one query)
            k_cache, v_cache = cache
            k_cache[:, :, pos : pos + tokens] = k
            v_cache[:, :, pos : pos + tokens] = v
            end = pos + tokens
            # the query heads of one KV head act as that head's query rows: GQA without copying the cache
            grouped = q.reshape(batch, self.kv_heads, group * tokens, self.head_dim)
            attn = F.scaled_dot_product_attention(grouped, k_cache[:, :, :end], v_cache[:, :, :end])
            attn = attn.reshape(batch, self.heads, tokens, self.head_dim)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Decoder(nn.Module):
    """Embedding, Llama blocks, final norm, ``lm_head``; ``prefill`` and ``decode`` return last-position logits."""

    def __init__(self, spec: dict, layers: int, max_positions: int) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec["vocab"], spec["hidden"])
        self.blocks = nn.ModuleList(Block(spec) for _ in range(layers))
        self.norm = nn.RMSNorm(spec["hidden"], eps=1e-5)
        self.lm_head = nn.Linear(spec["hidden"], spec["vocab"], bias=False)
        head_dim = spec["hidden"] // spec["heads"]
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _rope(self, start: int, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start : start + tokens].to(dtype), self.sin[start : start + tokens].to(dtype)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, vocab]`` of the last position of ``ids [batch, tokens]`` (no cache)."""
        x = self.embed(ids)
        cos, sin = self._rope(0, ids.shape[1], x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x[:, -1]))

    def decode(self, ids: torch.Tensor, caches: list, pos: int) -> torch.Tensor:
        """Logits ``[batch, vocab]`` for one new token ``ids [batch, 1]`` at position ``pos``, updating ``caches``."""
        x = self.embed(ids)
        cos, sin = self._rope(pos, 1, x.dtype)
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block(x, cos, sin, cache, pos)
        return self.lm_head(self.norm(x[:, -1]))

    def new_caches(self, batch: int, positions: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (K, V) caches ``[batch, kv_heads, positions, head_dim]`` filled with the same seeded values."""
        spec, generator = self.spec, torch.Generator(device=DEVICE).manual_seed(seed)
        shape = (batch, spec["kv_heads"], positions, spec["hidden"] // spec["heads"])

        def filled() -> torch.Tensor:
            return torch.randn(shape, device=DEVICE, generator=generator, dtype=torch.bfloat16)

        return [(filled(), filled()) for _ in self.blocks]


def is_decoder_linear(module: nn.Module, fqn: str) -> bool:
    """The pruned linears: every ``nn.Linear`` inside a block (embedding and ``lm_head`` stay dense)."""
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.")


@torch.no_grad()
def build_model(name: str, args: argparse.Namespace) -> Decoder:
    """A random bf16 model of ``name``'s shapes on the GPU, its decoder linears pruned to 2:4 by magnitude."""
    from nmperm_plugin.core.nm import NMPattern, nm_mask

    spec = MODELS[name]
    layers = args.layers or spec["layers"]
    max_positions = max([tokens for _, tokens in args.prefill] + [args.context + 1])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = Decoder(spec, layers, max_positions).eval()
    finally:
        torch.set_default_dtype(previous)
    model.cos, model.sin = model.cos.float(), model.sin.float()
    for fqn, module in model.named_modules():
        if is_decoder_linear(module, fqn):
            module.weight.mul_(nm_mask(module.weight.abs(), NMPattern(2, 4)))
    return model


# --- variants ---------------------------------------------------------------------------------------------


def variant_blocker(variant: str) -> str | None:
    """Why this GPU cannot run ``variant`` (None when it can)."""
    major, minor = torch.cuda.get_device_capability()
    if variant.startswith("fp8") and major != 9:
        return f"FP8 needs an SM 9.x GPU for the 2:4 kernel (this one is SM {major}.{minor}); both FP8 rows skipped"
    if variant == "sparse_bf16" and (major, minor) < (8, 0):
        return f"2:4 sparse tensor cores need SM 8.0+ (this GPU is SM {major}.{minor})"
    return None


@torch.no_grad()
def make_variant(dense: nn.Module, variant: str, token_counts: list[int], args: argparse.Namespace) -> tuple:
    """``(model, notes)``: ``dense`` itself for dense bf16, else a converted copy."""
    from nmperm_plugin import compat
    from nmperm_plugin.export import Float8SemiSparseWeightConfig, SemiSparseWeightConfig, prepare_linears_, sparsify_

    if variant == "dense_bf16":
        return dense, {}
    model = copy.deepcopy(dense)
    notes: dict = {}
    if variant == "sparse_bf16":
        backend = "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
        sparsify_(model, SemiSparseWeightConfig(backend=backend), filter_fn=is_decoder_linear)
        notes["backend"] = backend
        if backend == "cusparselt" and args.tune != "off":
            notes["cusparselt_linears"] = len(prepare_linears_(model, token_counts, args.tune))
    elif variant == "fp8_dense":
        compat.torchao_quantize_(model, compat.torchao_fp8_config(sparse=False), filter_fn=is_decoder_linear)
    elif variant == "fp8_sparse":
        sparsify_(model, Float8SemiSparseWeightConfig(), filter_fn=is_decoder_linear)
    return model, notes


def measure(fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Capture ``fn(ids)`` in a CUDA graph; its output, median replay time and (``--eager``) eager time."""
    from nmperm_plugin.export import GraphRunner

    runner = GraphRunner(fn, [ids], warmup=args.warmup)
    row = {"output": runner(ids), "ms": time_ms(lambda: runner.replay(ids), args.warmup, args.repeats)}
    if args.eager:
        with torch.inference_mode():
            row["eager_ms"] = time_ms(lambda: fn(ids), args.warmup, args.repeats)
    return row


def model_rows(name: str, args: argparse.Namespace) -> list[dict]:
    """Every (variant, phase, shape) of one model: latency, tokens/s, agreement with dense bf16."""
    from tqdm import tqdm

    dense = build_model(name, args)
    vocab = MODELS[name]["vocab"]
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    prefill_ids = {shape: torch.randint(0, vocab, shape, device=DEVICE, generator=generator) for shape in args.prefill}
    decode_ids = {b: torch.randint(0, vocab, (b, 1), device=DEVICE, generator=generator) for b in args.decode}
    token_counts = sorted({b * t for b, t in args.prefill} | set(args.decode))
    reference: dict[tuple, torch.Tensor] = {}
    rows = []
    for variant in ["dense_bf16"] + [v for v in args.variants if v != "dense_bf16"]:
        blocker = variant_blocker(variant)
        if blocker is not None:
            rows.append({"model": name, "variant": variant, "skipped": blocker})
            continue
        try:
            start = time.perf_counter()
            model, notes = make_variant(dense, variant, token_counts, args)
            notes["prepare_s"] = time.perf_counter() - start
        except Exception as error:  # a kernel or API missing here: record it, keep going
            rows.append({"model": name, "variant": variant, "error": error_text(error)})
            continue
        jobs = [("prefill", shape) for shape in args.prefill] + [("decode", (b, 1)) for b in args.decode]
        for phase, (batch, tokens) in tqdm(jobs, desc=f"{name} {variant}"):
            row = {"model": name, "variant": variant, "phase": phase, "batch": batch, "tokens": tokens} | notes
            try:
                if phase == "prefill":
                    result = measure(model.prefill, prefill_ids[(batch, tokens)], args)
                else:
                    caches = model.new_caches(batch, args.context + 1, seed=2)
                    step = lambda ids, m=model, c=caches: m.decode(ids, c, args.context)  # noqa: E731
                    result = measure(step, decode_ids[batch], args)
                    del caches
            except Exception as error:
                rows.append(row | {"error": error_text(error)})
                continue
            output = result.pop("output").float().cpu()
            row |= result | {"tokens_per_s": batch * tokens / (result["ms"] / 1000)}
            key = (phase, batch, tokens)
            if variant == "dense_bf16":
                reference[key] = output
            elif key in reference:
                row["rel_err_vs_dense_bf16"] = rel_err(output, reference[key])
                row["top1_agree"] = float((output.argmax(-1) == reference[key].argmax(-1)).float().mean())
                row["agrees"] = row["rel_err_vs_dense_bf16"] < TOLERANCE[variant]
            rows.append(row)
            torch.cuda.empty_cache()
        if model is not dense:
            del model
        torch.cuda.empty_cache()
    del dense
    torch.cuda.empty_cache()
    add_model_speedups(rows)
    return rows


def add_model_speedups(rows: list[dict]) -> None:
    """Dense time over 2:4 time at the same precision, and whether the issue-18 goal is met."""
    timed = {(r["model"], r["variant"], r["phase"], r["batch"], r["tokens"]): r for r in rows if "ms" in r}
    for (model, variant, phase, batch, tokens), row in timed.items():
        for sparse, dense in PAIRS:
            other = timed.get((model, dense, phase, batch, tokens))
            if variant == sparse and other is not None:
                row[f"speedup_over_{dense}"] = other["ms"] / row["ms"]
                if phase == "decode" or batch * tokens >= GOAL["prefill_min_tokens"]:
                    row["goal"] = GOAL[phase]
                    row["goal_met"] = row[f"speedup_over_{dense}"] >= GOAL[phase]


# --- per-linear table -------------------------------------------------------------------------------------


def linear_shapes(models: list[str]) -> list[tuple[int, int]]:
    """Deduplicated ``(in_features, out_features)`` of every decoder linear of ``models``."""
    shapes = []
    for name in models:
        spec = MODELS[name]
        kv = spec["kv_heads"] * spec["hidden"] // spec["heads"]
        h, i = spec["hidden"], spec["intermediate"]
        shapes += [(h, h), (h, kv), (h, i), (i, h)]
    return list(dict.fromkeys(shapes))


@torch.no_grad()
def linear_variants(weight: torch.Tensor, tokens: list[int], args: argparse.Namespace) -> dict[str, nn.Module]:
    """The same 2:4 weight as every variant the GPU supports (errors recorded by the caller)."""
    from nmperm_plugin import compat
    from nmperm_plugin.export import CusparseltLinear, Float8SemiSparseWeightConfig, SemiSparseWeightConfig, sparsify_

    def dense() -> nn.Module:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=DEVICE, dtype=torch.bfloat16)
        layer.weight.copy_(weight)
        return nn.Sequential(layer)

    built: dict[str, Callable[[], nn.Module]] = {"dense_bf16": dense}
    if variant_blocker("sparse_bf16") is None:

        def subclass() -> nn.Module:
            module = dense()
            sparsify_(module, SemiSparseWeightConfig())
            return module

        built["sparse_bf16_subclass"] = subclass
        if torch.backends.cusparselt.is_available():

            def tuned() -> nn.Module:
                layer = CusparseltLinear(weight)
                layer.tune_(tokens, args.tune, repeats=args.repeats)
                return layer

            built["sparse_bf16"] = tuned
    if variant_blocker("fp8_dense") is None:

        def fp8(sparse: bool) -> nn.Module:
            module = dense()
            if sparse:
                sparsify_(module, Float8SemiSparseWeightConfig())
            else:
                config = compat.torchao_fp8_config(sparse=False)
                compat.torchao_quantize_(module, config, lambda m, fqn: isinstance(m, nn.Linear))
            return module

        built["fp8_dense"], built["fp8_sparse"] = (lambda: fp8(False)), (lambda: fp8(True))
    return built


def linear_rows(args: argparse.Namespace) -> list[dict]:
    """For every decoder linear shape and token count: graph-replay time of each variant, eager dense/subclass."""
    from tqdm import tqdm

    from nmperm_plugin.core.nm import NMPattern, nm_mask
    from nmperm_plugin.export import GraphRunner

    rows = []
    for in_features, out_features in tqdm(linear_shapes(args.models), desc="linear shapes"):
        generator = torch.Generator(device=DEVICE).manual_seed(in_features * 31 + out_features)
        weight = torch.randn(out_features, in_features, device=DEVICE, generator=generator) / in_features**0.5
        weight = (weight * nm_mask(weight.abs(), NMPattern(2, 4))).to(torch.bfloat16)
        modules = {}
        errors = {}
        for variant, make in linear_variants(weight, args.linear_tokens, args).items():
            try:
                modules[variant] = make()
            except Exception as error:
                errors[f"{variant}_error"] = error_text(error)
        for tokens in args.linear_tokens:
            x = torch.randn(tokens, in_features, device=DEVICE, dtype=torch.bfloat16)
            row = {"in_features": in_features, "out_features": out_features, "tokens": tokens} | errors
            outputs = {}
            for variant, module in modules.items():
                try:
                    runner = GraphRunner(module, [x], warmup=args.warmup)
                    outputs[variant] = runner(x)
                    row[f"{variant}_ms"] = time_ms(lambda r=runner, x=x: r.replay(x), args.warmup, args.repeats)
                    if variant in ("dense_bf16", "sparse_bf16_subclass"):
                        with torch.inference_mode():
                            row[f"{variant}_eager_ms"] = time_ms(lambda m=module, x=x: m(x), args.warmup, args.repeats)
                except Exception as error:
                    row[f"{variant}_error"] = error_text(error)
            for variant, output in outputs.items():
                if variant != "dense_bf16" and "dense_bf16" in outputs:
                    row[f"rel_err_{variant}"] = rel_err(output, outputs["dense_bf16"])
            for sparse, dense in PAIRS + (("sparse_bf16_subclass", "dense_bf16"),):
                if f"{sparse}_ms" in row and f"{dense}_ms" in row:
                    row[f"speedup_{sparse}_over_{dense}"] = row[f"{dense}_ms"] / row[f"{sparse}_ms"]
            row["outputs_agree"] = all(
                row[f"rel_err_{v}"] < TOLERANCE[v.removesuffix("_subclass")] for v in outputs if f"rel_err_{v}" in row
            )
            rows.append(row)
        del modules
        torch.cuda.empty_cache()
    return rows


# --- gather norm ------------------------------------------------------------------------------------------


def gather_norm(norm: torch.nn.Module, perm: torch.Tensor) -> torch.nn.Module:
    """The ``fold: gather`` norm: ``nmperm_plugin.learn.fold.GatherNorm`` (its reference form if not importable)."""
    try:
        from nmperm_plugin.learn.fold import GatherNorm
    except ImportError:

        class GatherNorm(torch.nn.Module):
            def __init__(self, norm: torch.nn.Module, perm: torch.Tensor) -> None:
                super().__init__()
                self.norm = norm
                self.register_buffer("perm", perm)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.norm(x).index_select(-1, self.perm)

    return GatherNorm(norm, perm).to(DEVICE)


def bench_norm(hidden: int, tokens: int, args: argparse.Namespace) -> dict:
    """Plain RMSNorm against the gathering norm (eager and compiled), plus a bare gather (``o_proj`` input)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden).to(DEVICE, torch.bfloat16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    perm = torch.randperm(hidden, device=DEVICE)
    gathered = gather_norm(norm, perm)
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    row: dict = {"hidden": hidden, "tokens": tokens}
    with torch.inference_mode():
        row["outputs_agree"] = bool(torch.equal(gathered(x), norm(x)[..., perm]))
        row["plain_norm_ms"] = time_ms(lambda: norm(x), args.warmup, args.repeats)
        row["gather_norm_ms"] = time_ms(lambda: gathered(x), args.warmup, args.repeats)
        row["gather_only_ms"] = time_ms(lambda: x.index_select(-1, perm), args.warmup, args.repeats)
        if not args.no_compile:
            plain_c, gathered_c = torch.compile(norm, dynamic=False), torch.compile(gathered, dynamic=False)
            row["outputs_agree"] &= rel_err(gathered_c(x), gathered(x)) < 1e-2
            row["plain_norm_compiled_ms"] = time_ms(lambda: plain_c(x), args.warmup, args.repeats)
            row["gather_norm_compiled_ms"] = time_ms(lambda: gathered_c(x), args.warmup, args.repeats)
    row["gather_overhead_eager"] = row["gather_norm_ms"] / row["plain_norm_ms"] - 1
    if "gather_norm_compiled_ms" in row:
        row["gather_overhead_compiled"] = row["gather_norm_compiled_ms"] / row["plain_norm_compiled_ms"] - 1
    return row


# --- whole model ------------------------------------------------------------------------------------------


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def prompt_ids(directory: Path, prompt: str, vocab_size: int) -> torch.Tensor:
    """The prompt through the checkpoint's tokenizer, or fixed token ids when it has none."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)(prompt, return_tensors="pt").input_ids.to(DEVICE)
    except (OSError, ValueError, TypeError):
        return (torch.arange(1, 17) * 7 % vocab_size).unsqueeze(0).to(DEVICE)


def timed_generate(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens after the prompt and the wall seconds the generation took."""
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else (model.generation_config.eos_token_id or 0)
    pad = pad[0] if isinstance(pad, list) else pad
    synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)
    synchronize()
    return out[0, ids.shape[1] :].cpu(), time.perf_counter() - start


def check_model(directory: Path, args: argparse.Namespace) -> dict:
    """Convert a pruned checkpoint and compare its greedy tokens with the unconverted pruned model."""
    from transformers import AutoModelForCausalLM

    from nmperm_plugin.export import TorchaoExportConfig, export_checkpoint

    config = TorchaoExportConfig(dtype=args.check_dtype, backend=args.check_backend, device=DEVICE)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=config.torch_dtype).to(DEVICE).eval()
    ids = prompt_ids(directory, args.prompt, reference.config.vocab_size)
    expected, reference_s = timed_generate(reference, ids, args.max_new_tokens)
    del reference
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    model, report = export_checkpoint(directory, config)
    timed_generate(model, ids, 2)  # warm-up (kernel selection, lazy registration)
    tokens, converted_s = timed_generate(model, ids, args.max_new_tokens)
    differ = (tokens != expected).nonzero()
    return {
        "directory": str(directory),
        "dtype": args.check_dtype,
        "backend": config.backend,
        "export": {"counts": report.counts(), "ok": report.ok, "notes": report.notes},
        "same_tokens": bool(torch.equal(tokens, expected)),
        "first_difference": int(differ[0, 0]) if len(differ) else None,
        "reference_tokens": expected.tolist(),
        "converted_tokens": tokens.tolist(),
        "reference_seconds": reference_s,
        "converted_seconds": converted_s,
    }


# --- driver -----------------------------------------------------------------------------------------------


def environment() -> dict:
    import torchao

    return {
        "gpu": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": torch.backends.cusparselt.is_available(),
        "cusparselt_version": torch.backends.cusparselt.version(),
    }


def model_table(rows: list[dict]) -> str:
    """The whole-model table (markdown): one line per model, phase, shape and variant."""
    lines = [
        "| model | phase | batch x tokens | variant | ms | tokens/s | 2:4 speed-up (same precision) | goal | "
        "rel err vs dense bf16 | top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "phase" not in row:
            lines.append(f"| {row['model']} | | | {row['variant']} | {row.get('skipped') or row.get('error')} |||||")
            continue
        if "ms" not in row:
            lines.append(
                f"| {row['model']} | {row['phase']} | {row['batch']}x{row['tokens']} | {row['variant']} | "
                f"{row.get('error')} |||||"
            )
            continue
        speedup = next((value for key, value in row.items() if key.startswith("speedup_over_")), None)
        goal = "" if "goal" not in row else f"{'met' if row['goal_met'] else 'MISSED'} (>= {row['goal']}x)"
        err = row.get("rel_err_vs_dense_bf16")
        lines.append(
            f"| {row['model']} | {row['phase']} | {row['batch']}x{row['tokens']} | {row['variant']} | "
            f"{row['ms']:.3f} | {row['tokens_per_s']:,.0f} | {'' if speedup is None else f'{speedup:.2f}x'} | {goal} | "
            f"{'' if err is None else f'{err:.2e}'} | {row.get('top1_agree', '')} |"
        )
    return "\n".join(lines)


def linear_table(rows: list[dict]) -> str:
    """The per-linear table (markdown): graph-replay ms of each variant, eager dense/subclass, speed-ups."""
    variants = ("dense_bf16", "sparse_bf16", "sparse_bf16_subclass", "fp8_dense", "fp8_sparse")
    lines = [
        "| in x out | tokens | " + " | ".join(f"{v} ms" for v in variants) + " | eager dense ms | eager subclass ms | "
        "2:4 bf16 speed-up | FP8 2:4 speed-up |",
        "|---|---|" + "---|" * (len(variants) + 4),
    ]

    def cell(row: dict, key: str) -> str:
        return f"{row[key]:.4f}" if key in row else ("err" if f"{key.removesuffix('_ms')}_error" in row else "")

    for row in rows:
        bf16 = row.get("speedup_sparse_bf16_over_dense_bf16")
        fp8 = row.get("speedup_fp8_sparse_over_fp8_dense")
        lines.append(
            f"| {row['in_features']} x {row['out_features']} | {row['tokens']} | "
            + " | ".join(cell(row, f"{v}_ms") for v in variants)
            + f" | {cell(row, 'dense_bf16_eager_ms')} | {cell(row, 'sparse_bf16_subclass_eager_ms')} | "
            f"{'' if bf16 is None else f'{bf16:.2f}x'} | {'' if fp8 is None else f'{fp8:.2f}x'} |"
        )
    return "\n".join(lines)


def summary(result: dict) -> str:
    """The human-readable digest (also written as the ``.md`` result file)."""
    env = result["environment"]
    parts = [
        f"# serve_speed: {env['gpu']} (SM {'.'.join(map(str, env['capability']))}), torch {env['torch']}, "
        f"torchao {env['torchao']}, cuSPARSELt {env['cusparselt_version']}",
        "",
        "Medians of CUDA-event timings of CUDA-graph replays; random weights with 2:4 zeros in every decoder "
        "linear (embedding and lm_head dense).",
    ]
    if result.get("model"):
        parts += ["", "## Whole model", "", model_table(result["model"])]
    if result.get("linear"):
        parts += ["", "## Per linear (graph replay; eager for dense and SparseSemiStructuredTensor)", ""]
        parts.append(linear_table(result["linear"]))
    for row in result.get("norm", []):
        compiled = row.get("gather_overhead_compiled")
        extra = "" if compiled is None else f", compiled {compiled:+.1%}"
        parts.append(f"norm {row['hidden']} tokens {row['tokens']}: gather {row['gather_overhead_eager']:+.1%}{extra}")
    if "model_check" in result:
        check = result["model_check"]
        parts.append(f"\nmodel check ({check['dtype']}): same greedy tokens: {check['same_tokens']}")
    return "\n".join(parts)


def write_result(result: dict, directory: Path, started: float, path: Path | None = None) -> Path:
    """``serve_speed-<gpu>-<time>.json`` and the same digest as ``.md`` in ``directory`` (or at
    ``path``), stamped by bench/result_files.py (seeds: the random weights' generators, 0 and 1)."""
    if path is None:
        slug = re.sub(r"[^a-z0-9]+", "-", result["environment"]["gpu"].lower()).strip("-")
        path = directory / f"serve_speed-{slug}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_pair(path, result, summary(result) + "\n", seeds=[0, 1], started=started, device="cuda")
    return path


def all_agree(result: dict) -> bool:
    """Every measured variant's outputs within tolerance of dense bf16 (and norms/model check where run)."""
    model = all(row.get("agrees", True) for row in result.get("model", []))
    linear = all(row["outputs_agree"] for row in result.get("linear", []))
    norm = all(row["outputs_agree"] for row in result.get("norm", []))
    return model and linear and norm


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when all outputs agree, 1 otherwise, 2 without CUDA."""
    if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(ROOT))
    started = time.time()
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    result: dict = {"environment": environment(), "settings": settings, "tolerance": TOLERANCE, "goal": GOAL}
    path = None
    if not args.skip_bench:
        if not args.no_model:
            result["model"] = []
            for name in args.models:
                result["model"] += model_rows(name, args)
                path = write_result(result, args.out, started, path)  # keep what is done if cut short
        if not args.no_linear:
            result["linear"] = linear_rows(args)
        if args.norms:
            result["norm"] = [bench_norm(HIDDEN[m], tokens, args) for m in args.models for tokens in TOKENS]
    if args.check_model is not None:
        result["model_check"] = check_model(args.check_model, args)
    path = write_result(result, args.out, started, path)
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    print(summary(result))
    check = result.get("model_check")
    same = check is None or check["same_tokens"] or args.check_dtype == "fp8"  # FP8 is lossy: reported only
    return 0 if all_agree(result) and same else 1


if __name__ == "__main__":
    sys.exit(main())
