#!/usr/bin/env bash
# Fine-tune the real all-MiniLM-L6-v2 on real SST-2 on a local Ray cluster (2 DeepSpeed workers,
# ZeRO-2, W&B offline unless WANDB_API_KEY is set), then predict with the saved model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
name="quickstart-$(date +%Y%m%d-%H%M%S)"
.venv/bin/orchestrator train configs/quickstart.yaml --set "name=$name" "$@"
.venv/bin/orchestrator predict "runs/$name/final" "a gripping , beautifully acted film" "a dull , lifeless mess"
