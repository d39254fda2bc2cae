"""Serving speed of torchao 2:4 sparse linears against dense ones, and the cost of the ``gather`` norm (CUDA only).

For the linear shapes of SmolLM2-135M, LLaMA-3.2-1B and LLaMA-2-7B (in_features x out_features) at
1, 16, 256 and 4096 tokens it times, with CUDA events after a warm-up (median of repeats):

- dense bf16 against 2:4 bf16 (``SemiSparseWeightConfig``, cuSPARSELt and CUTLASS);
- FP8 dense (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``) against FP8 2:4
  (``packing_format=Float8PackingFormat.SPARSE_CUTLASS``), on SM 9.x GPUs;

and checks that every variant's output agrees with its dense reference. It also times a plain RMSNorm
against the ``fold: gather`` norm (``GatherNorm``: RMSNorm then an index gather), eager and compiled.
``--check-model DIR`` additionally converts a pruned checkpoint with ``nmperm_plugin.export`` and checks
that it generates the same greedy tokens as the unconverted pruned model.

    python bench/serve_speed.py                              # all shapes, writes bench/results/serve_speed-*.json
    python bench/serve_speed.py --check-model out/smollm2-24 --skip-bench
    python bench/serve_speed.py --models smollm2-135m --tokens 1 256 --repeats 20

Exit status: 0 when every output agrees (and the model check, if run, gives the same tokens in bf16/fp16),
1 otherwise, 2 without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SHAPES = {  # (in_features, out_features) of q, k/v, o, gate/up, down (deduplicated)
    "smollm2-135m": [(576, 576), (576, 192), (576, 1536), (1536, 576)],
    "llama-3.2-1b": [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)],
    "llama-2-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
}
HIDDEN = {"smollm2-135m": 576, "llama-3.2-1b": 2048, "llama-2-7b": 4096}
TOKENS = (1, 16, 256, 4096)
TOLERANCE = {"sparse_vs_dense_bf16": 1e-2, "fp8_sparse_vs_fp8_dense": 3e-2, "fp8_vs_bf16": 0.1}
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"
NO_CUDA = (
    "serve_speed.py: no CUDA GPU found; the 2:4 sparse kernels (cuSPARSELt, CUTLASS) run only on CUDA, "
    "so nothing was measured"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS), help="batch x tokens per matmul")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-fp8", action="store_true", help="skip the FP8 measurements")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd norms")
    parser.add_argument(
        "--compile-linears", action="store_true", help="also time torch.compile'd dense and cuSPARSELt linears"
    )
    parser.add_argument("--skip-bench", action="store_true", help="only run --check-model")
    parser.add_argument(
        "--check-model", type=Path, default=None, help="pruned checkpoint dir for the whole-model check"
    )
    parser.add_argument("--check-dtype", choices=("bf16", "fp16", "fp8"), default="bf16")
    parser.add_argument("--check-backend", choices=("cusparselt", "cutlass"), default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON result file")
    return parser.parse_args(argv)


# --- timing -------------------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` on the GPU in milliseconds (CUDA events, after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 error ``||actual - expected|| / ||expected||``."""
    expected = expected.float()
    return float((actual.float() - expected).norm() / expected.norm().clamp_min(1e-12))


# --- linear layers ----------------------------------------------------------------------------------------


def pruned_weight(in_features: int, out_features: int, seed: int) -> torch.Tensor:
    """A random bf16 ``[out, in]`` weight with a magnitude 2:4 mask, on the GPU."""
    from nmperm_plugin.nm import NMPattern, nm_mask

    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    weight = torch.randn(out_features, in_features, device=DEVICE, generator=generator) / in_features**0.5
    return (weight * nm_mask(weight.abs(), NMPattern(2, 4))).to(torch.bfloat16)


def linear_with(weight: torch.Tensor, variant: str) -> torch.nn.Module:
    """An ``nn.Linear`` holding ``weight``, converted by torchao for ``variant``."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    from torchao.quantization.quantize_.workflows import Float8PackingFormat
    from torchao.sparsity import sparsify_
    from torchao.sparsity.sparse_api import SemiSparseWeightConfig

    from nmperm_plugin.export.torchao import force_cutlass

    out_features, in_features = weight.shape
    module = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False, device=DEVICE))
    module = module.to(torch.bfloat16)
    module[0].weight.data.copy_(weight)
    if variant in ("sparse_cusparselt", "sparse_cutlass"):
        with force_cutlass(variant == "sparse_cutlass"):
            sparsify_(module, SemiSparseWeightConfig())
    elif variant == "fp8_dense":
        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    elif variant == "fp8_sparse":
        config = Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow(), packing_format=Float8PackingFormat.SPARSE_CUTLASS
        )
        quantize_(module, config)
    return module


def kernel_blocker(dtype: str, backend: str | None = None) -> str | None:
    """Why this GPU cannot run a 2:4 kernel (None when it can): the export's own rule, so the
    benchmark and ``nmperm export`` agree (FP8 2:4 needs SM 9.x, torch's CUTLASS bf16 kernel SM 8.x)."""
    from nmperm_plugin.export.torchao import TorchaoExportConfig, gpu_blocker

    return gpu_blocker(TorchaoExportConfig(dtype=dtype, backend=backend), torch.device(DEVICE))


def bench_linear(in_features: int, out_features: int, tokens: int, args: argparse.Namespace) -> dict:
    """Time every variant of one linear shape at ``tokens`` rows and compare outputs."""
    weight = pruned_weight(in_features, out_features, seed=in_features * 31 + out_features)
    x = torch.randn(tokens, in_features, device=DEVICE, dtype=torch.bfloat16)
    row: dict = {"in_features": in_features, "out_features": out_features, "tokens": tokens}
    variants = ["dense_bf16", "sparse_cusparselt"]
    cutlass_blocker = kernel_blocker("bf16", "cutlass")
    if cutlass_blocker is None:
        variants.append("sparse_cutlass")
    else:
        row["sparse_cutlass_skipped"] = cutlass_blocker
    variants += ["fp8_dense", "fp8_sparse"] if kernel_blocker("fp8") is None and not args.no_fp8 else []
    outputs = {}
    for variant in variants:
        try:
            with torch.no_grad():
                module = linear_with(weight, variant)
            with torch.inference_mode():
                outputs[variant] = module(x)
                row[f"{variant}_ms"] = time_ms(lambda m=module: m(x), args.warmup, args.repeats)
                if args.compile_linears and variant in ("dense_bf16", "sparse_cusparselt"):
                    compiled = torch.compile(module, dynamic=False)
                    compiled(x)
                    row[f"{variant}_compiled_ms"] = time_ms(lambda m=compiled: m(x), args.warmup, args.repeats)
        except Exception as error:  # a kernel missing from this build or GPU: record it, keep going
            row[f"{variant}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    add_agreement(row, outputs)
    add_speedups(row)
    row["complete"] = not any(key.endswith("_error") for key in row)
    return row


def add_agreement(row: dict, outputs: dict[str, torch.Tensor]) -> None:
    """Relative errors of each sparse output against its dense reference, and whether all are in tolerance."""
    pairs = {
        "sparse_cusparselt_vs_dense_bf16": ("sparse_cusparselt", "dense_bf16", "sparse_vs_dense_bf16"),
        "sparse_cutlass_vs_dense_bf16": ("sparse_cutlass", "dense_bf16", "sparse_vs_dense_bf16"),
        "fp8_sparse_vs_fp8_dense": ("fp8_sparse", "fp8_dense", "fp8_sparse_vs_fp8_dense"),
        "fp8_sparse_vs_dense_bf16": ("fp8_sparse", "dense_bf16", "fp8_vs_bf16"),
    }
    agree = True
    for name, (actual, expected, tolerance) in pairs.items():
        if actual in outputs and expected in outputs:
            row[f"rel_err_{name}"] = rel_err(outputs[actual], outputs[expected])
            agree &= row[f"rel_err_{name}"] < TOLERANCE[tolerance]
    row["outputs_agree"] = bool(agree)


def add_speedups(row: dict) -> None:
    """Dense time over sparse time for each pair that was measured."""
    for sparse, dense in (
        ("sparse_cusparselt", "dense_bf16"),
        ("sparse_cutlass", "dense_bf16"),
        ("fp8_sparse", "fp8_dense"),
        ("sparse_cusparselt_compiled", "dense_bf16_compiled"),
    ):
        if f"{sparse}_ms" in row and f"{dense}_ms" in row:
            row[f"speedup_{sparse}_over_{dense}"] = row[f"{dense}_ms"] / row[f"{sparse}_ms"]


# --- gather norm ------------------------------------------------------------------------------------------


def gather_norm(norm: torch.nn.Module, perm: torch.Tensor) -> torch.nn.Module:
    """The ``fold: gather`` norm: ``nmperm_plugin.fold.GatherNorm`` (its reference form if not importable)."""
    try:
        from nmperm_plugin.fold import GatherNorm
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
    }


def run_benchmarks(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """All linear and norm measurements for the chosen models and token counts."""
    from tqdm import tqdm

    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    jobs = [(shape, tokens) for model in args.models for shape in SHAPES[model] for tokens in args.tokens]
    linears = [bench_linear(*shape, tokens, args) for shape, tokens in tqdm(jobs, desc="linear shapes")]
    norms = [bench_norm(HIDDEN[model], tokens, args) for model in args.models for tokens in args.tokens]
    return linears, norms


def write_result(result: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", result["environment"]["gpu"].lower()).strip("-")
    path = directory / f"serve_speed-{slug}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def summary(result: dict) -> str:
    """A short human-readable digest of the result file."""
    lines = []
    for row in result.get("linear", []):
        speedups = {
            key.split("_over_")[0].removeprefix("speedup_"): value for key, value in row.items() if "speedup" in key
        }
        text = ", ".join(f"{name} x{value:.2f}" for name, value in speedups.items()) or "no sparse timing"
        flag = "" if row["outputs_agree"] and row["complete"] else "  <-- CHECK"
        lines.append(f"{row['in_features']:>6} x {row['out_features']:<6} tokens {row['tokens']:>5}: {text}{flag}")
    for row in result.get("norm", []):
        compiled = row.get("gather_overhead_compiled")
        extra = "" if compiled is None else f", compiled {compiled:+.1%}"
        lines.append(
            f"norm {row['hidden']:>5} tokens {row['tokens']:>5}: gather {row['gather_overhead_eager']:+.1%}{extra}"
        )
    if "model_check" in result:
        check = result["model_check"]
        lines.append(f"model check ({check['dtype']}): same greedy tokens: {check['same_tokens']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(ROOT))
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    result: dict = {"environment": environment(), "settings": settings, "tolerance": TOLERANCE}
    if not args.skip_bench:
        result["linear"], result["norm"] = run_benchmarks(args)
    if args.check_model is not None:
        result["model_check"] = check_model(args.check_model, args)
    path = write_result(result, args.out)
    print(f"wrote {path}")
    rows = result.get("linear", []) + result.get("norm", [])
    agree = all(row["outputs_agree"] and row.get("complete", True) for row in rows)
    check = result.get("model_check")
    same = check is None or check["same_tokens"] or args.check_dtype == "fp8"  # FP8 is lossy: reported only
    print(summary(result))
    return 0 if agree and same else 1


if __name__ == "__main__":
    sys.exit(main())
