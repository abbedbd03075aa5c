#!/usr/bin/env bash
# Features of a plain install (pip install -e ., no extras), offline, beyond the demo: a
# 2-step fine-tune on chat records ("messages") with a tiny model whose tokenizer has a chat
# template, generate --chat with the result, and a LLaMA tokenizer shipped as tokenizer.model
# only (SentencePiece). Run it with the plain install's python on PATH, from any directory;
# the test data is the shared folder next to the clone ($1, default ../shared). Every command
# must exit 0 and print nothing that does not concern the user: no traceback, no
# transformers PyTorch notice, no raw warning or library log line. About 2 minutes on 2 cores.
set -euo pipefail

shared="${1:-$(dirname "$0")/../../shared}"
smollm="$shared/models/smollm2-135m-instruct"
llama="$shared/tokenizers/llama"
if [[ ! -f "$smollm/tokenizer.json" || ! -f "$smollm/chat_template.jinja" \
      || ! -f "$llama/tokenizer.model" ]]; then
    echo "plain_features: no test data in $shared (models/smollm2-135m-instruct," \
         "tokenizers/llama); skipped"
    exit 0
fi
smollm="$(cd "$smollm" && pwd)"
llama="$(cd "$llama" && pwd)"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work="$(mktemp -d "${TMPDIR:-/tmp}/falqon-plain.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"

# check NAME COMMAND...: run COMMAND; fail on a non-zero exit, a traceback or the notice.
check() {
    local name="$1" log="$work/$1.log" started=$SECONDS
    shift
    if ! "$@" >"$log" 2>&1; then
        cat "$log"
        echo "plain_features: FAILED: $name exited non-zero: $*" >&2
        exit 1
    fi
    # a traceback, transformers' PyTorch notice, a raw Python warning or a library's log line
    if grep -q -E -e "Traceback|PyTorch was not found" -e "^[^ ]*:[0-9]+: [A-Za-z]*Warning: " \
            -e "^(WARNING|ERROR):[A-Za-z_.]+:" "$log"; then
        cat "$log"
        echo "plain_features: FAILED: $name printed what does not concern the user (above)" >&2
        exit 1
    fi
    echo "plain_features: $name ok ($((SECONDS - started)) s)"
}

# A tiny LLaMA (the tiny card's shape, random weights) with SmolLM2's vocabulary (49152
# tokens, BOS 1, EOS 2 like the card) as a Hugging Face folder, SmolLM2's tokenizer and chat
# template copied beside it by the project's own export.
check tiny-chat-model python - "$work/tiny-chat" "$smollm" <<'EOF'
import dataclasses
import sys

from falqon_jax.cli import quiet_output

quiet_output()  # as the commands do, before transformers is imported

import jax.numpy as jnp  # noqa: E402

from falqon_jax.export.writer import export_model  # noqa: E402
from falqon_jax.model.config import load_card  # noqa: E402
from falqon_jax.model.llama import Llama, LlamaModel, plan_linears  # noqa: E402
from falqon_jax.model.loading import random_params  # noqa: E402

config = dataclasses.replace(load_card("tiny"), vocab_size=49152)
module = Llama(config, plan_linears(config), jnp.float32)
export_model(LlamaModel(module, random_params(module, 0)), sys.argv[1], dtype="float32",
             tokenizer_dir=sys.argv[2])
EOF
test -f tiny-chat/chat_template.jinja

# A dozen chats in TRL's "messages" format, some with a system turn, one with two rounds.
check chat-data python - "$work/chats.jsonl" <<'EOF'
import json
import sys

with open(sys.argv[1], "w", encoding="utf-8") as f:
    for i in range(12):
        messages = [{"role": "system", "content": "You are brief."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": f"What is {i} plus {i}?"},
                     {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
        if i == 5:
            messages += [{"role": "user", "content": "And times two?"},
                         {"role": "assistant", "content": f"{4 * i}."}]
        f.write(json.dumps({"messages": messages}) + "\n")
EOF

check chat-finetune python -m falqon_jax.train --model "$work/tiny-chat" --data chats.jsonl \
    --out run --steps 2 --batch-size 4 --eval-size 2 --rank 8 --source-len 64 \
    --target-len 32 --log-every 1 --eval-every 2 --save-every 2 --sample-tokens 4 \
    --dtype float32 --no-remat
test -f run/metrics.jsonl

check generate-chat python -m falqon_jax.generate --model run --chat \
    --system "You are brief." --prompt "What is 3 plus 3?" --max-new-tokens 4

# A LLaMA tokenizer as tokenizer.model only (no tokenizer.json): SentencePiece, converted by
# transformers; the run's model (49152 tokens) takes its 32000 ids.
mkdir spm
cp "$llama/tokenizer.model" "$llama/tokenizer_config.json" spm/
check spm-tokenizer python -m falqon_jax.generate --model run --tokenizer spm \
    --prompt "Once upon a time" --max-new-tokens 4

# Features behind an extra, on this install without it: --help works, and asking for one says
# in one line which extra to install (exit 2), before anything is loaded or written.
check eval-help python -m falqon_jax.eval --help
refused() {
    local name="$1" log="$work/$1.log" code=0
    shift
    "$@" >"$log" 2>&1 || code=$?
    if [[ $code != 2 || $(wc -l <"$log") != 1 ]] || ! grep -q "pip install" "$log"; then
        cat "$log"
        echo "plain_features: FAILED: $name: expected one line naming the extra, exit 2" \
             "(got exit $code): $*" >&2
        exit 1
    fi
    echo "plain_features: $name refused in one line: $(cat "$log")"
}
refused eval-without-extra python -m falqon_jax.eval --model run --tasks arc_easy
refused train-eval-tasks-without-extra python -m falqon_jax.train --out run-eval --steps 2 \
    --eval-tasks arc_easy
refused report-to-without-extra python -m falqon_jax.train --out run-tb --steps 2 \
    --report-to tensorboard
test ! -e run-eval && test ! -e run-tb

echo "plain_features: all ok in $SECONDS s"
