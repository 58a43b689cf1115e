#!/usr/bin/env bash
# The decoder_lm sweep in one command on a GPU machine that has no corpus: CACHE is a text cache holding
# only lm/<tag>/ (the tokenizer and token rows `fffjax.train.lm.prepare_lm_data` builds, 46 MB for the
# `small` size), which a complete cache lets the runs read without the corpus. Train (cut at
# TRAIN_TIMEOUT seconds, default 420), analyse, then OUT/results/decoder_lm_gpu.{json,md,png} and the
# runs' JSON as OUT/decoder_lm_gpu_runs.tgz (checkpoints stay behind).
#   bash experiments/gpu_decoder_lm.sh CACHE OUT --seeds 0 --steps 1500 --parallel 4
set -uo pipefail
cache=$1 out=$2; shift 2
runs=/tmp/decoder_lm_gpu
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout "${TRAIN_TIMEOUT:-420}" python experiments/decoder_lm.py train --runs $runs --cache "$cache" "$@" 2>&1 | tee "$out/train.log" | tail -12
timeout 90 python experiments/decoder_lm.py analyse --runs $runs --cache "$cache" --parallel 4 2>&1 | tail -3
tar czf "$out/decoder_lm_gpu_runs.tgz" -C $runs --exclude=checkpoints --exclude=.jax_cache .
python experiments/decoder_lm.py report --runs $runs --out "$out/results" --name decoder_lm_gpu 2>&1 | tail -2
