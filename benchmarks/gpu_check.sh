#!/usr/bin/env bash
# The GPU paths, checked on a machine with GPUs (meant to take a few minutes); appends a dated section to BENCHMARKS.md:
# DDP across the unfreeze on all GPUs, 16-mixed and bf16-mixed, SyncBatchNorm, train.py's fit against a plain
# loop (ResNet-18, 224 px, batch 256) with and without channels-last and the GPU utilisation, and the headline
# run: EfficientNet-Lite0 with the MobileNetV2 recipe on all of CIFAR-10 (5 epochs, 224 px) against the blog's
# 94.31 % test accuracy.
#
#   benchmarks/gpu_check.sh --cifar10 cifar10-jpg.tar.gz --resnet18 resnet18-f37072fd.pth
#   benchmarks/gpu_check.sh --dry-run --cifar10 ... --resnet18 ...   # print every command, check that it composes
#   benchmarks/gpu_check.sh --tiny                                   # every step for real, tiny, on the CPU
#
# A GPU machine reaches no network, so the data and weights come as files: the CIFAR-10 JPEG archive
# (train/<class>/*.jpg, test/<class>/*.jpg) and torchvision's ResNet-18 weights (or $CIFAR10_TGZ,
# $RESNET18_WEIGHTS). --out FILE: where the section goes (default BENCHMARKS.md; with --tiny, <work>/gpu_check.md).
# --work DIR: extracted data, logs and run folders (default a new folder in /tmp). $PYTHON: default python.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
    echo "Error: $*" >&2
    exit 1
}

cifar=${CIFAR10_TGZ:-} weights=${RESNET18_WEIGHTS:-} out="" work="" dry=0 tiny=0 py=${PYTHON:-python}
while (($#)); do
    case $1 in
    --cifar10) cifar=${2:?}; shift 2 ;;
    --resnet18) weights=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    --work) work=${2:?}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --tiny) tiny=1; shift ;;
    -h | --help) sed -n '2,/^set -/{/^set -/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
done

if ((!tiny)); then  # the files a GPU machine cannot download
    nothing="a GPU machine downloads nothing"
    [[ -n $cifar ]] || die "--cifar10 <cifar10-jpg.tar.gz> (or \$CIFAR10_TGZ) is needed: $nothing"
    [[ -f $cifar ]] || die "--cifar10 $cifar: no such file"
    [[ -n $weights ]] || die "--resnet18 <resnet18-f37072fd.pth> (or \$RESNET18_WEIGHTS) is needed: $nothing"
    [[ -f $weights ]] || die "--resnet18 $weights: no such file"
    cifar=$(realpath "$cifar") weights=$(realpath "$weights")
fi
work=${work:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$work/logs"
work=$(realpath "$work")
((tiny)) && out=${out:-$work/gpu_check.md}
out=${out:-BENCHMARKS.md}
export FINETUNE_ROOT=$work  # run folders under <work>/logs/, not the project's

gpus=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L | grep -c '^GPU') || true
fi
if ((gpus == 0 && !tiny && !dry)); then
    die "no GPU here (nvidia-smi finds none): run with --tiny for the same steps on the CPU"
fi
on_gpu=$((gpus > 0 && !tiny))

# What each step trains on: all GPUs, or tiny on the CPU
if ((tiny)); then
    data=$work/tiny
    short=(data=imagefolder "data.root=$data" data.image_size=32 data.batch_size=4 data.num_workers=0 model=resnet18
        strategy.pretrained=false trainer.max_epochs=2)
    one=(trainer=cpu) all=(trainer=ddp_cpu)
    bench=(--accelerator cpu --models tiny --sizes 32 --batch-size 4 --steps 2 --warmup 1 --rounds 1 "--data=$data"
        data.num_workers=0)
    headline=(data.image_size=32 data.batch_size=4 data.num_workers=0 trainer.max_epochs=2 "strategy.unfreeze_at=[1]"
        trainer=cpu)
    fp16_skip="16-mixed needs a GPU" syncbn_skip="PyTorch's SyncBatchNorm has no CPU kernel"
else
    data=$work/cifar10
    short=(data=imagefolder "data.root=$data" data.image_size=224 data.batch_size=128 data.val_fraction=0 model=resnet18
        "model.weights_path=$weights" trainer.max_epochs=2 ++trainer.limit_train_batches=40
        ++trainer.limit_val_batches=10 ++trainer.limit_test_batches=10)
    one=(trainer=gpu) all=(trainer=ddp "trainer.devices=$((gpus > 0 ? gpus : 1))")
    bench=(--accelerator gpu --models resnet18 --sizes 224 --batch-size 256 --steps 20 --warmup 5 --rounds 2
        "--data=$data")
    headline=(trainer=gpu)
    fp16_skip="" syncbn_skip=""
fi
one_gpu=""
((on_gpu && gpus == 1)) && one_gpu=", 1 GPU: one process, so SyncBatchNorm stays BatchNorm"
quiet=(~callbacks.progress_bar ~callbacks.model_summary ++trainer.enable_progress_bar=false)

quote() {  # the arguments as a shell reads them back (shlex.quote)
    local arg words=()
    for arg; do
        if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then words+=("$arg"); else words+=("'${arg//\'/\'\\\'\'}'"); fi
    done
    echo "${words[*]}"
}

rows=() commands=() failed=0 util=""

finish() {  # the section, with whatever steps ran (also after a failure or a kill)
    if ((dry || ${#rows[@]} == 0)); then return; fi
    local date machine
    date=$(date +%Y-%m-%d)
    if ((on_gpu)); then
        machine="$gpus x $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sort -u |
            paste -sd ';')"
    else
        machine="every step tiny on the CPU (--tiny)"
    fi
    {
        echo
        echo "## GPU check, $date (benchmarks/gpu_check.sh)"
        echo
        echo "**Machine:** $machine; $("$py" -c 'import os, torch
print(f"{len(os.sched_getaffinity(0))} CPU cores, torch {torch.__version__}, CUDA {torch.version.cuda}")').
**Ran on a GPU:** $( ((on_gpu)) && echo yes || echo no)."
        echo
        echo "| step | result | wall s |"
        echo "|---|---|---|"
        printf '%s\n' "${rows[@]}"
        for name in throughput throughput_nchw; do
            [[ -f $work/logs/$name.log ]] || continue
            echo
            echo "train.py's fit against the plain loop ($name.log, ratio = fit / plain, images/s):"
            echo
            sed -n '/^| model |/,$p' "$work/logs/$name.log"
        done
        [[ -n $util ]] && printf '\nGPU utilisation (nvidia-smi every 0.5 s): %s\n' "$util"
        echo
        echo '```bash'
        printf '%s\n' "${commands[@]}"
        echo '```'
    } >>"$out"
    echo "Results appended to $out (ran on a GPU: $( ((on_gpu)) && echo yes || echo no))"
}
trap finish EXIT
trap 'exit 143' TERM INT

gpu_utilisation() {  # <sample file>: mean and max over every GPU and sample
    awk '$1 ~ /^[0-9]+$/ {s += $1; n++; if ($1 > m) m = $1}
        END {if (n) printf "mean %.0f %%, max %d %%", s / n, m}' "$1"
}

# step <id> <title> <why skipped, or ""> <command...>: run it, log it, record a row
step() {
    local id=$1 title=$2 skip=$3
    shift 3
    local command
    command=$(quote "$@")
    command=${command/#$(quote "$py")/python}
    if [[ -n $skip ]]; then
        echo "== $title: skipped ($skip)"
        rows+=("| $title | skipped: $skip | - |")
        return
    fi
    echo "== $title"
    echo "   $command"
    commands+=("$command")
    if ((dry)); then
        echo "$command" >>"$work/commands.txt"
        return
    fi
    local log=$work/logs/$id.log start=$SECONDS sampler="" result
    if ((on_gpu)); then
        nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 >"$work/logs/$id.gpu" &
        sampler=$!
    fi
    if "$@" >"$log" 2>&1; then result=ok; else result="FAILED (exit $?, $log)" && failed=$((failed + 1)); fi
    if [[ -n $sampler ]]; then
        kill "$sampler"
        wait "$sampler" 2>/dev/null || true
    fi
    local acc unfrozen usage
    acc=$(grep -o 'Test accuracy: [0-9.]*' "$log" | tail -1 | cut -d' ' -f3) || true
    [[ -n $acc ]] && result+=", test acc $acc"
    unfrozen=$(grep -o 'Training the top [0-9]* of [0-9]* backbone stages' "$log" | awk '{print $4}' | uniq |
        paste -sd '>') || true  # under DDP every process logs it
    [[ $unfrozen == *">"* ]] && result+=", trainable stages ${unfrozen//>/ -> }"
    if [[ -n $sampler ]]; then
        usage=$(gpu_utilisation "$work/logs/$id.gpu")
        result+=", GPU $usage"
        util+="${util:+; }$title: $usage"
    fi
    rows+=("| $title | $result | $((SECONDS - start)) |")
    echo "   $result ($((SECONDS - start)) s)"
    [[ $result == ok* ]] || tail -n 20 "$log"
}

where="no GPU here"
((tiny)) && where="tiny, on the CPU"
((on_gpu)) && where="on $gpus GPU(s)"
echo "GPU check$( ((dry)) && echo ", dry run"): $where; work folder $work"

if ((!dry)); then  # the data
    if ((tiny)); then
        "$py" - "$data" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)
for split, count in (("train", 8), ("test", 4)):
    for index, name in enumerate(("blue", "red")):
        folder = Path(sys.argv[1]) / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.zeros((40, 40, 3))
            pixels[..., 2 - 2 * index] = 200  # each class a colour, with noise
            pixels = np.clip(pixels + rng.normal(0, 30, pixels.shape), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / f"{i}.png")
EOF
    elif [[ ! -d $data/train ]]; then
        echo "Extracting $cifar into $data"
        mkdir -p "$data"
        tar -xzf "$cifar" -C "$data"
        [[ -d $data/train ]] || die "$cifar holds no train/ folder at its top (expected train/<class>/*.jpg, test/...)"
    fi
fi
rm -f "$work/commands.txt"

step ddp_unfreeze "DDP across the unfreeze (${all[*]})" "" \
    "$py" train.py "${short[@]}" "${quiet[@]}" "${all[@]}" strategy=freeze_unfreeze "strategy.unfreeze_at=[1]"
step fp16 "trainer.precision=16-mixed" "$fp16_skip" \
    "$py" train.py "${short[@]}" "${quiet[@]}" "${one[@]}" trainer.precision=16-mixed
step bf16 "trainer.precision=bf16-mixed" "" \
    "$py" train.py "${short[@]}" "${quiet[@]}" "${one[@]}" trainer.precision=bf16-mixed
step syncbn "model.sync_batchnorm=true (${all[*]}$one_gpu)" "$syncbn_skip" \
    "$py" train.py "${short[@]}" "${quiet[@]}" "${all[@]}" model.sync_batchnorm=true
step throughput "fit vs plain loop, channels-last (default)" "" \
    "$py" -m benchmarks.throughput "${bench[@]}"
step throughput_nchw "fit vs plain loop, model.channels_last=false" "" \
    "$py" -m benchmarks.throughput "${bench[@]}" model.channels_last=false
step headline "headline: EfficientNet-Lite0, CIFAR-10, MobileNetV2 recipe (blog: 94.31 %)" "" \
    "$py" train.py experiment=mobilenetv2_cifar10 model=efficientnet_lite0 "data.root=$data" data.val_fraction=0 \
    "${quiet[@]}" "${headline[@]}"

if ((dry)); then
    echo "== Composing every config (nothing runs)"
    "$py" -m benchmarks.compose_check <"$work/commands.txt"
    exit
fi
((failed == 0)) || die "$failed steps failed: their logs are in $work/logs"
