"""`felix export gguf|hf`: deployment files for llama.cpp and HF transformers, with a memory report."""

from __future__ import annotations

import argparse

from felix.cli import print_json
from felix.commands.arg_types import add_json_flag

GGUF_HELP = """\
Write a llama-architecture GGUF that stock llama.cpp loads (dtypes f32, f16, q8_0, q4_0), or the
llama.cpp fork's RQ4 (--dtype rq4, ggml type 42: stock llama.cpp cannot load it).

The checkpoint's applied splices (CHECKPOINT/splices/) are exported with it.
SpliceCore: by default (and with --merge-splice) it is merged into ffn_down. With
--splice-adapter FILE the base GGUF holds the plain weights and FILE is a llama.cpp LoRA adapter
(f32, alpha = rank, each layer's gate folded into lora_b): scale 1 is the model as trained and edited,
0 the base model, and the llama.cpp server can change the scale at runtime (POST /lora-adapters)
without a rebuild.
"""

HF_HELP = """\
Write safetensors (float32), config.json, generation_config.json and tokenizer files that transformers
loads with AutoModelForCausalLM / AutoTokenizer (SpliceCore, with the applied splices, merged into
down_proj), and felix_export.json, which lists them.

An existing --out is replaced only when it is empty or an earlier felix HF export; files you added to
an earlier export (a model card README.md, a license) are kept, the export's own are rewritten.

The memory report is transformers': the weights in float32 as written and in bfloat16
(dtype=torch.bfloat16), each with the KV cache its DynamicCache holds in that dtype at --kv-context
positions, batch 1.
"""
HF_KV_CONTEXT_HELP = ("positions transformers' KV cache is budgeted for in the memory report (prompt + generated "
                      "tokens; default the model's max_seq_len)")


def register(sub: argparse._SubParsersAction, help: str) -> None:
    from felix.commands.quantize import add_kv_context_argument, add_llama_run_arguments
    from felix.export_gguf import DTYPES

    p = sub.add_parser("export", help=help,
                       description=__doc__)
    fmt = p.add_subparsers(dest="format", metavar="<format>", required=True)

    g = fmt.add_parser("gguf", help="llama.cpp GGUF (+ SpliceCore as a LoRA adapter)", description=GGUF_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--checkpoint", required=True,
                   help="checkpoint dir, run dir (latest), model.safetensors or `felix quantize` artifact")
    g.add_argument("--out", required=True, help="GGUF file to write (its directory must exist)")
    # a choice, as quantize's --format is (the exporter still refuses an unknown one from the API)
    g.add_argument("--dtype", default="f16", choices=DTYPES, help="weight type (default f16)")
    splice = g.add_mutually_exclusive_group()
    splice.add_argument("--merge-splice", action="store_true",
                        help="merge SpliceCore into ffn_down (the default when neither flag is given)")
    splice.add_argument("--splice-adapter", metavar="FILE",
                        help="write SpliceCore as a separate llama.cpp LoRA adapter GGUF instead of merging")
    add_kv_context_argument(g)
    add_llama_run_arguments(g)
    add_json_flag(g)
    g.set_defaults(func=run_gguf)

    h = fmt.add_parser("hf", help="HF transformers directory (LlamaForCausalLM + fast tokenizer)",
                       description=HF_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("--checkpoint", required=True,
                   help="checkpoint dir, run dir (latest), model.safetensors or `felix quantize` artifact")
    h.add_argument("--out", required=True, help="directory to write: new, empty, or an earlier felix HF export "
                                                "(its parent must exist)")
    add_kv_context_argument(h, HF_KV_CONTEXT_HELP)
    add_json_flag(h)
    h.set_defaults(func=run_hf)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _print_memory(mem: dict) -> None:
    cap = mem["cap_bytes"]
    padded = f" (llama.cpp pads it to {mem['kv_cells']})" if mem["kv_cells"] != mem["context"] else ""
    adapter = " + adapter" if mem["adapter"] else ""
    print(f"deployment memory (weights + f16 KV cache at {mem['context']} context{padded}{adapter} + llama.cpp "
          f"compute and output buffers at n_ubatch {mem['n_ubatch']}, flash attention "
          f"{'on' if mem['flash_attn'] else 'off'}; cap {cap / 2**30:.0f} GiB):")
    for model, rows in mem["models"].items():
        cells = "  ".join(f"{d} {r['total_bytes'] / 2**30:.2f} GiB{'' if r['fits_cap'] else ' (over)'}"
                          for d, r in rows.items())
        print(f"  {model:<11} {cells}")


def _print_written(report: dict) -> None:
    print(f"wrote {report['out']} ({_mib(report['bytes'])})")
    if report.get("adapter"):
        print(f"wrote {report['adapter']} ({_mib(report['adapter_bytes'])}, LoRA alpha {report['adapter_alpha']:g})")
    if report.get("kept"):
        print(f"kept what you added to the earlier export: {', '.join(report['kept'])}")
    if report.get("note"):
        print(f"note: {report['note']}")


def run_gguf(args: argparse.Namespace) -> int:
    from felix.commands.quantize import kv_context, llama_run, note_kv_context
    from felix.config import ModelConfig
    from felix.export_gguf import export_gguf
    from felix.export_memory import memory_report

    report = export_gguf(args.checkpoint, args.out, args.dtype, args.splice_adapter)
    model = ModelConfig(**report["model"])
    # merged, SpliceCore is in ffn_down: the deployment counts an adapter only with --splice-adapter
    report["deployment_memory"] = memory_report(model, context=kv_context(args), adapter=bool(args.splice_adapter),
                                                **llama_run(args))
    note_kv_context(args, model.max_seq_len)
    if args.json:
        print_json(report)
        return 0
    _print_written(report)
    _print_memory(report["deployment_memory"])
    return 0


def run_hf(args: argparse.Namespace) -> int:
    from felix.commands.quantize import note_kv_context
    from felix.config import ModelConfig
    from felix.export_hf import export_hf
    from felix.export_memory import hf_memory

    report = export_hf(args.checkpoint, args.out)
    model = ModelConfig(**report["model"])
    mem = report["deployment_memory"] = hf_memory(model, args.kv_context)
    note_kv_context(args, model.max_seq_len, mem["context"], runtime="transformers")
    if args.json:
        print_json(report)
        return 0
    _print_written(report)
    print(f"transformers memory (weights + its DynamicCache's KV cache at {mem['context']} positions, batch 1, both "
          f"in the dtype loaded; activations and framework memory not counted; cap {mem['cap_bytes'] / 2**30:.0f} "
          f"GiB):")
    for dtype, r in mem["models"]["this_model"].items():
        how = "as written" if dtype == "float32" else f"dtype=torch.{dtype}"
        print(f"  {dtype:<9} ({how}) {r['total_bytes'] / 2**20:.1f} MiB = weights {r['weights_bytes'] / 2**20:.1f} "
              f"+ KV {r['kv_cache_bytes'] / 2**20:.1f}{'' if r['fits_cap'] else ' (over the cap)'}")
    return 0
