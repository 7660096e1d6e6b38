"""Export a run to GGUF at every quantization type the gguf package writes, and print the fidelity table.

    python scripts/export_table.py RUN_DIR [--examples 48] [--quant f16 --quant q8_0 ...]

Each export is kept with --force, so that types above their limit are measured too (their report entries say
``passed: false``). The numbers behind README's "Export to GGUF / Ollama" table and ``export.KL_LIMITS``.
"""

from __future__ import annotations

import argparse
import logging
import platform
from importlib.metadata import version

import torch
import transformers

from lora_ft.shipping.export import KL_LIMITS, export_run
from lora_ft.shipping.gguf_file import QUANT_TYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--quant", action="append", default=None, choices=list(QUANT_TYPES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"gguf {version('gguf')}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    rows = ["| type | file size | tensors | mean KL | max KL | top-1 agreement | loss adapter | loss GGUF | "
            "tokenizer | limit | passed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for quant in args.quant or list(QUANT_TYPES):
        e = export_run(args.run_dir, quant, force=True, examples=args.examples)
        types = ", ".join(f"{n} {t}" for t, n in sorted(e["tensor_types"].items()))
        rows.append(f"| {quant} | {e['size_bytes'] / 2**20:.1f} MiB | {types} | {e['kl_mean']:.3g} | "
                    f"{e['kl_max']:.3g} | {e['top1_agreement']:.4f} | {e['loss_adapter']:.4f} | "
                    f"{e['loss_gguf']:.4f} | {e['tokenizer']['identical']}/{e['tokenizer']['texts']} | "
                    f"{KL_LIMITS[quant]:g} | {e['passed']} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
