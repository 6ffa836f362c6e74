# What a machine with a CUDA GPU runs first, from the repository's root (a few minutes on one H200; BENCHMARKS.md
# section 5): every config a few CUDA steps, whose loss must fall; train_ddp.py with DDP and with FSDP2 over
# NCCL; sample.py plain, speculative, V4 and DSA; bench.py's serve (--quick) and mfu (--quick) sections.
# Configs whose corpus is not here train on Tiny Shakespeare instead. Needs `python prepare.py shakespeare_char`,
# `python prepare.py shakespeare` and, for serve, requirements-extra.txt. Runs and logs go to out-gpu-check/.
#   bash tests/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1
OUT_DIR=out-gpu-check; LOGS=$OUT_DIR/logs; mkdir -p $LOGS
T0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - T0 )) s" | tee -a $LOGS/steps.log; }
fell() {  # each run's first and last training loss, and whether it fell
  python3 - "$OUT_DIR" "$@" <<'PY'
import json, os, sys
for name in sys.argv[2:]:
    path = os.path.join(sys.argv[1], name, 'metrics.jsonl')
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    losses = [(r['iter'], r['loss']) for r in rows if r.get('loss') is not None]
    if not losses:
        print(f"{name:24s} FAILED: no training steps logged (see {sys.argv[1]}/logs)")
        continue
    (i, a), (j, b) = losses[0], losses[-1]
    val = next((r['val_loss'] for r in reversed(rows) if 'val_loss' in r), float('nan'))
    mem = next((r['mem_mb'] for r in reversed(rows) if 'mem_mb' in r), 0)
    print(f"{name:24s} loss {a:.3f} (iter {i}) -> {b:.3f} (iter {j}) {'falls' if b < a - 0.1 else 'DOES NOT FALL'}, "
          f"val {val:.3f}, peak {mem:,.0f} MB")
PY
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $LOGS/env.txt
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a $LOGS/env.txt

stamp "every config, 30 steps, side by side on the one GPU"
RUN="--max_time=0 --max_iters=30 --warmup_iters=5 --eval_interval=30 --eval_iters=2 --log_interval=1 --sample_tokens=32 --overwrite=True"
CONFIGS=$(cd config && ls *.py | sed 's/\.py$//')
for c in $CONFIGS; do
  case $c in
    wikitext_moe) data="--dataset=shakespeare --sample_interval=30";;
    smollm2_135m|deepseek_smollm2|cosmopedia_774m)  # SmolLM2's vocabulary: characters fit in it, samples would not decode
      data="--dataset=shakespeare_char --vocab_size=49152 --gradient_accumulation_steps=1 --sample_interval=0";;
    *) data="--sample_interval=30";;
  esac
  timeout 300 python3 train.py config/$c.py $RUN $data --out_dir=$OUT_DIR/$c > $LOGS/train_$c.log 2>&1 &
done
wait
fell $CONFIGS | tee $LOGS/summary.txt

stamp "train_ddp.py over NCCL; sample.py"
timeout 120 torchrun --standalone --nproc_per_node=1 train_ddp.py config/shakespeare_moe.py $RUN --sample_interval=30 --out_dir=$OUT_DIR/ddp > $LOGS/ddp.log 2>&1 &
timeout 120 torchrun --standalone --nproc_per_node=1 train_ddp.py config/shakespeare_moe.py $RUN --sample_interval=30 --fsdp=True --out_dir=$OUT_DIR/fsdp > $LOGS/fsdp.log 2>&1 &
timeout 120 python3 sample.py --out_dir=$OUT_DIR/shakespeare_char_moe --max_new_tokens=300 --temperature=0 > $LOGS/sample.log 2>&1 &
timeout 120 python3 sample.py --out_dir=$OUT_DIR/shakespeare_mtp --max_new_tokens=200 --temperature=0 --speculative=True > $LOGS/sample_speculative.log 2>&1 &
timeout 120 python3 sample.py --out_dir=$OUT_DIR/shakespeare_char_v4 --max_new_tokens=200 > $LOGS/sample_v4.log 2>&1 &
timeout 120 python3 sample.py --out_dir=$OUT_DIR/shakespeare_char_dsa --max_new_tokens=200 > $LOGS/sample_dsa.log 2>&1 &
wait
fell ddp fsdp | tee -a $LOGS/summary.txt
for f in sample sample_speculative sample_v4 sample_dsa; do echo "-- $f: $(grep -E 'tokens in|Error' $LOGS/$f.log || echo FAILED)"; done | tee -a $LOGS/summary.txt

stamp "bench.py serve and mfu"
timeout 200 python3 bench.py --only=serve --quick --out=$LOGS/bench_serve.json > $LOGS/serve.log 2>&1; grep -E '^  serve|[Ee]rror' $LOGS/serve.log
timeout 300 python3 bench.py --only=mfu --quick --out=$LOGS/bench_mfu.json > $LOGS/mfu.log 2>&1; grep -E '^  mfu|[Ee]rror' $LOGS/mfu.log
stamp done
grep -l Traceback $LOGS/*.log | sed 's/^/traceback in /'
