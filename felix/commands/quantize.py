"""`felix quantize`: pack a checkpoint's weights into a deployment format and report the sizes."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from felix.cli import print_json
from felix.commands.arg_types import add_json_flag, int_at_least
from felix.errors import FelixError

HELP = """Quantize a checkpoint into a packed artifact (directory: weights.safetensors + manifest.json +
tokenizer.json) that `felix generate --checkpoint OUT` loads, and print the size report: bytes,
bits/weight over the quantized tensors and overall, deployment memory (weights + fp16 KV cache at
--kv-context positions, default 2048, + llama.cpp's compute and output buffers for --ubatch-size and
--flash-attn) against the 4 GiB cap, and seconds taken.

Formats: rq4 (BetaQ, 4.5 bits/weight), rq3 (3.5), nf4 (4.5), q8_0 (8.5), q4_0 (4.5); q8_0/q4_0 are
byte-identical to the gguf package's quantizers. 2-D weights with >= 1024 elements are quantized
(SpliceCore included); norms and the SpliceCore gate stay fp32; --embeddings picks the token
embedding's encoding (quantize: the format, as the production fork does; q8_0; keep: fp16).
A checkpoint's applied splices (CHECKPOINT/splices/) are quantized with it: --splice-rounding.

--config FILE instead of --checkpoint quantizes random-init weights of that config (for timing,
e.g. `felix quantize --config configs/felix-300m.yaml --format rq4 --json`); --out is optional,
without it nothing is written. Each tensor is quantized in cache-sized chunks spread over
--threads worker threads (default: torch's thread count). The report gives wall and CPU seconds:
on a shared machine the wall time depends on what else runs.
"""


KV_CONTEXT_HELP = ("positions the fp16 KV cache is budgeted for in the deployment memory: the context your "
                   "llama.cpp server runs with (-c / n_ctx; default 2048; llama.cpp rounds it up to a multiple "
                   "of 256). Past the model's max_seq_len the figures still hold, with a note: llama.cpp runs "
                   "such a context with RoPE beyond the positions the model was trained on")
UBATCH_HELP = ("tokens llama.cpp computes at once (-ub / --ubatch-size; default 512, its default): the "
               "deployment memory counts llama.cpp's compute buffer for a ubatch this size")
FLASH_ATTN_HELP = ("budget that compute buffer for llama.cpp with flash attention (-fa on; llama.cpp's default "
                   "-fa auto turns it on where the backend supports it). Without this flag the estimate is "
                   "for flash attention off, which holds the attention scores of a whole ubatch: context x "
                   "ubatch x n_heads f32, 1 GiB for felix-300m at --kv-context 32768")


def add_kv_context_argument(parser: argparse.ArgumentParser, help: str = KV_CONTEXT_HELP) -> None:
    """--kv-context N; None when not given (the figures then use the default)."""
    parser.add_argument("--kv-context", type=int_at_least(1), metavar="N", help=help)


def add_llama_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--ubatch-size N and --flash-attn: the llama.cpp run whose compute buffer the deployment memory counts."""
    parser.add_argument("--ubatch-size", type=int_at_least(1), metavar="N", help=UBATCH_HELP)
    parser.add_argument("--flash-attn", action="store_true", help=FLASH_ATTN_HELP)


def kv_context(args: argparse.Namespace) -> int:
    """The context the deployment figures assume: --kv-context, or the default."""
    from felix.llama_memory import KV_CONTEXT

    return KV_CONTEXT if args.kv_context is None else args.kv_context


def llama_run(args: argparse.Namespace) -> dict:
    """The llama.cpp run the deployment figures assume: n_ubatch and flash_attn, from the flags or defaults."""
    from felix.llama_memory import N_UBATCH

    return {"n_ubatch": N_UBATCH if args.ubatch_size is None else args.ubatch_size, "flash_attn": args.flash_attn}


def note_kv_context(args: argparse.Namespace, max_seq_len: int, context: int | None = None,
                    runtime: str = "llama.cpp") -> None:
    """On stderr: a budgeted context (`context`, default `kv_context(args)`: asked for or the default) past the
    model's trained positions, which `runtime` runs all the same (llama.cpp warns, then runs it)."""
    context = kv_context(args) if context is None else context
    if context <= max_seq_len:
        return
    given = (f"--kv-context {context}" if args.kv_context is not None
             else f"the default KV context {context} (--kv-context {max_seq_len} budgets the model's own)")
    print(f"note: {given} is past the model's max_seq_len {max_seq_len}: the memory figures are for that "
          f"context, where {runtime} applies RoPE beyond the positions the model was trained on (its output "
          f"there is untested)", file=sys.stderr)


def register(sub: argparse._SubParsersAction, help: str) -> None:
    from felix.quant_formats import FORMATS
    from felix.quantize import EMBEDDING_POLICIES

    p = sub.add_parser("quantize", help=help,
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run dir (latest checkpoint) or checkpoint dir")
    src.add_argument("--config", help="YAML config or packaged name: random-init weights (timing)")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="weight format to pack into")
    p.add_argument("--out", help="artifact directory to write (replaced whole if it is an older artifact; "
                                 "refused while that holds splice edits or a `felix serve` serves it)")
    p.add_argument("--embeddings", choices=EMBEDDING_POLICIES, default="quantize",
                   help="token embedding / output head: the format (default), q8_0, or keep (fp16)")
    p.add_argument("--splice-rounding", choices=["auto", "gptq", "plain"], default="auto",
                   help="a checkpoint with applied splices (CHECKPOINT/splices/) is quantized with them; its "
                        "SpliceCore tensors are GPTQ-rounded, weighted by training text and the edits' keys "
                        "(a codebook format only: rq4, rq3, nf4), or rounded plainly; auto (default): gptq for "
                        "the codebook formats, plain for q8_0/q4_0")
    p.add_argument("--seed", type=int, help="random init seed with --config (default 0)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    add_kv_context_argument(p)
    add_llama_run_arguments(p)
    add_json_flag(p)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides with --config")
    p.set_defaults(func=run)


def _refuse_inside_out(out: str, source: Path, what: str) -> None:
    """FelixError when `source` (a file --config reads) is --out or lies inside it."""
    out_r, src = Path(out).resolve(), source.resolve()
    if out_r == src or out_r in src.parents:
        raise FelixError(f"--out {out} holds the {what} it is made from ({source}); writing the artifact "
                         f"would replace it")


def _source(args: argparse.Namespace):
    """(state dict, FelixConfig, tokenizer path or None, source description, splices report or None)."""
    import torch

    from felix.atomic import check_apart
    from felix.checkpoint import TOKENIZER_FILE, load_checkpoint, resolve_checkpoint
    from felix.config import load_config, resolve_config_path
    from felix.model import FelixLM
    from felix.patches import PatchStack

    if args.checkpoint:
        if args.overrides:
            raise FelixError("config overrides only apply with --config")
        if args.seed is not None:  # a checkpoint's weights are what they are: nothing is drawn at random
            raise FelixError("--seed only applies with --config (it seeds the random init)")
        path = resolve_checkpoint(args.checkpoint)
        if args.out:  # before the work: an artifact inside a checkpoint is lost when the run prunes it
            check_apart(args.out, path, "--out")
        tok = path / TOKENIZER_FILE
        stack = PatchStack.open(path)
        if len(stack):  # what is quantized is the model as edited
            from felix.splice_pack import spliced_state

            state, config, splices = spliced_state(stack, args.format, args.splice_rounding, args.embeddings)
        else:
            ckpt = load_checkpoint(path)
            state, config, splices = ckpt.model_state, ckpt.config, None
        return state, config, tok if tok.is_file() else None, str(path / "model.safetensors"), splices
    cfg = load_config(args.config, args.overrides)
    tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer and Path(cfg.data.tokenizer).is_file() else None
    if args.out:  # an older artifact at --out is replaced whole, taking any file inside it along
        _refuse_inside_out(args.out, resolve_config_path(args.config), "config")
        if tok is not None and tok.resolve() != (Path(args.out) / TOKENIZER_FILE).resolve():  # that one is copied
            _refuse_inside_out(args.out, tok, "tokenizer")
    seed = 0 if args.seed is None else args.seed
    torch.manual_seed(seed)
    model = FelixLM(cfg.model)
    return model.state_dict(), cfg, tok, f"random init of {args.config} (seed {seed})", None


def quantize_command(args: argparse.Namespace) -> dict:
    """Everything `felix quantize` does; returns the report."""
    from felix.atomic import check_output
    from felix.quant_artifact import check_replaceable, write_artifact
    from felix.quantize import check_state, pack_state, size_report

    if args.out is not None and not args.out.strip():  # `--out "$OUT"` with OUT unset: say so, not "not written"
        raise FelixError("--out is empty")
    if args.out:  # before the work (GPTQ on felix-300m takes minutes); write_artifact checks again
        check_replaceable(args.out)
        check_output(args.out, "--out", directory=True)
    from felix.splice_pack import splice_rounding

    splice_rounding(args.splice_rounding, args.format)  # an impossible gptq is refused before the work
    if args.threads is not None:
        import torch

        if args.threads <= 0:
            raise FelixError("--threads must be positive")
        torch.set_num_threads(args.threads)
    state, cfg, tokenizer, source, splices = _source(args)
    check_state(state, cfg.model, source)
    t0, cpu0 = time.perf_counter(), time.process_time()
    packed = pack_state(state, args.format, args.embeddings, source)
    # CPU seconds next to wall seconds: on a shared machine the wall time mostly measures the other jobs
    quantize_s, quantize_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    report = size_report(packed, cfg.model, args.format, kv_context(args), **llama_run(args)) | {
        "embeddings": args.embeddings, "source": source, "splices": splices}
    note_kv_context(args, cfg.model.max_seq_len)
    t1 = time.perf_counter()
    if args.out:
        write_artifact(args.out, packed, cfg, report, tokenizer, source)
    report |= {"out": args.out, "tokenizer_copied": bool(args.out and tokenizer), "quantize_seconds": quantize_s,
               "quantize_cpu_seconds": quantize_cpu_s,
               "write_seconds": time.perf_counter() - t1, "seconds": time.perf_counter() - t0}
    return report


def run(args: argparse.Namespace) -> int:
    r = quantize_command(args)
    if args.json:
        print_json(r)
        return 0
    mib = 2**20
    qbpw = r["quantized_bits_per_weight"]
    padded = "" if r["kv_cells"] == r["kv_context"] else f" (padded to {r['kv_cells']})"
    buffers = r["compute_buffer_bytes"] + r["output_buffer_bytes"]
    rows = [
        ("source", r["source"]),
        ("format", f"{r['format']} (embeddings: {r['embeddings']})"),
        ("quantized tensors", f"{r['quantized_params']:,} params in {r['quantized_bytes']:,} bytes"
                              + (f" = {qbpw:.4f} bits/weight" if qbpw else "")),
        ("all weights", f"{r['params']:,} params in {r['weight_bytes']:,} bytes = {r['bits_per_weight']:.4f} "
                        f"bits/weight ({r['weight_bytes'] / mib:.1f} MiB; fp32: {r['fp32_weight_bytes'] / mib:.1f})"),
        ("by encoding", ", ".join(f"{k}: {v['tensors']} tensors {v['bytes']:,} B"
                                  for k, v in r["by_encoding"].items())),
        ("deployment", f"{r['deployment_bytes'] / mib:.1f} MiB = weights + {buffers / mib:.1f} MiB llama.cpp "
                       f"buffers (n_ubatch {r['n_ubatch']}, flash attention {'on' if r['flash_attn'] else 'off'}) "
                       f"+ {r['kv_cache_bytes'] / mib:.1f} MiB fp16 KV at {r['kv_context']} ctx{padded}; "
                       f"{'within' if r['fits_vram_cap'] else 'OVER'} the {r['vram_cap_bytes'] / 2**30:.0f} GiB cap"),
        ("time", f"{r['quantize_seconds']:.2f} s quantize ({r['quantize_cpu_seconds']:.2f} CPU s), "
                 f"{r['write_seconds']:.2f} s write"),
        ("splices", "none" if not r["splices"] else
                    f"{r['splices']['patches']} patches applied ({r['splices']['fact_edits']} fact edits), "
                    f"SpliceCore rounded {r['splices']['rounding']}"
                    + (f" in {r['splices']['seconds']:.1f} s" if "seconds" in r["splices"] else "")),
        ("artifact", r["out"] or "(not written: no --out)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
