#!/usr/bin/env bash
# Defense table on the CIFAR-10 JPEG copy (training-time defenses; docs/defense_table_cifar10.md).
# Every defense fine-tunes the same natural small_cnn checkpoint with identical settings (1 epoch over a 30%
# slice of the training split, SGD lr 0.01, cosine schedule, batch 128, seed 0); "natural" is the same
# fine-tuning without a regularizer. Each model is then attacked by fragdefense-eval twice on the same 64 test
# images: the Ghorbani top-k attack and an IFIA-style attack (random start, softplus beta 50, best iterate by
# Kendall), on saliency and IG.
#
#   FRAGDEFENSE_CIFAR10_JPEG=/path/to/cifar10-jpeg NATURAL_CKPT=runs/cifar10_small_cnn_e8/checkpoints/best-epoch07.ckpt \
#   OUT=runs/defense N_IMAGES=32 bash scripts/defense_table.sh natural input_grad input_grad_w0.02 pgd_at pgd_at_eps2 ssr igr
#   python scripts/defense_table.py runs/defense --out docs/results/defense_cifar10/table.md
set -euo pipefail
: "${FRAGDEFENSE_CIFAR10_JPEG:?set FRAGDEFENSE_CIFAR10_JPEG to the extracted cifar10-jpeg directory}"
: "${NATURAL_CKPT:?set NATURAL_CKPT to a trained small_cnn checkpoint}"
OUT=${OUT:-runs/defense}
N_IMAGES=${N_IMAGES:-64}
declare -A REG=(
  [natural]="regularizer=none"
  [input_grad]="regularizer=input_grad regularizer.weight=0.05"
  [pgd_at]="regularizer=pgd_at"
  [pgd_at_eps2]="regularizer=pgd_at regularizer.eps=2/255 regularizer.step_size=0.5/255"
  [pgd_at_eps1.5]="regularizer=pgd_at regularizer.eps=1.5/255 regularizer.step_size=0.375/255"
  [input_grad_w0.02]="regularizer=input_grad regularizer.weight=0.02"
  [ssr]="regularizer=ssr regularizer.weight=0.1 regularizer.max_samples=32"
  [igr]="regularizer=igr regularizer.weight=2.0 regularizer.ig_steps=4 regularizer.max_samples=16"
  [art]="regularizer=art"
  [ig_norm]="regularizer=ig_norm regularizer.weight=0.1"
  [trades]="regularizer=trades"
  [cure]="regularizer=cure regularizer.weight=0.5"
  [trades_eps2]="regularizer=trades regularizer.eps=2/255 regularizer.step_size=0.5/255"
  [cure_w0.05]="regularizer=cure regularizer.weight=0.05"
)
for name in "$@"; do
  run="$OUT/$name"
  if [ ! -f "$run/metrics.json" ]; then
    fragdefense-train experiment=cifar10_small_cnn data.root="$FRAGDEFENSE_CIFAR10_JPEG" \
      model.weights_path="$NATURAL_CKPT" ${REG[$name]} \
      trainer.max_epochs=1 +trainer.limit_train_batches=0.3 module.optimizer.lr=0.01 module.scheduler.name=cosine \
      logger=csv run_dir="$run" hydra.run.dir="$run"
  fi
  ck="$run/checkpoints/last.ckpt"
  common=(checkpoint="$ck" data=imagefolder data.root="$FRAGDEFENSE_CIFAR10_JPEG" n_images="$N_IMAGES" batch_size=64
          'eps=[8/255]' methods.integrated_gradients.steps=16 protocol.k=100 n_figure_images=2)
  [ -f "$run/eval_ghorbani/results.json" ] || fragdefense-eval "${common[@]}" 'attacks=[random_sign,topk]' \
      protocol.steps=15 protocol.step_size=1/255 protocol.beta=10 out_dir="$run/eval_ghorbani" hydra.run.dir="$run/eval_ghorbani"
  [ -f "$run/eval_ifia/results.json" ] || fragdefense-eval "${common[@]}" 'attacks=[topk]' \
      protocol.steps=20 protocol.step_size=1/255 protocol.beta=50 protocol.random_start=true protocol.criterion=kendall \
      out_dir="$run/eval_ifia" hydra.run.dir="$run/eval_ifia"
done
