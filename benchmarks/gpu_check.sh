#!/usr/bin/env bash
# One GPU check, under 8 minutes on one H200:
#   (a) the intervention invariants and streaming-vs-naive parity, on the tiny random pipelines, on the
#       device, in float32 (DITLOC_TEST_DEVICE moves the test fixtures' pipelines there);
#   (b) benchmarks/localize_overhead.py at the released shapes (PixArt-XL-2-1024, SANA-1600M-1024px,
#       FLUX.1-dev, SD3.5-large), bfloat16, each in its own process, each writing JSON;
#   (c) one markdown table: localize and withhold ratios (time, peak memory) and whether the goals hold.
#
#   bash benchmarks/gpu_check.sh                        # on a CUDA machine
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=tiny GPU_CHECK_DTYPE=float32 GPU_CHECK_STEPS=2 \
#     GPU_CHECK_PROMPTS=1 GPU_CHECK_REPEATS=1 GPU_CHECK_TESTS=0 bash benchmarks/gpu_check.sh   # CPU smoke run
#
# Settings (environment): GPU_CHECK_DEVICE (cuda), GPU_CHECK_SIZE (xl; small, tiny), GPU_CHECK_DTYPE
# (bfloat16), GPU_CHECK_STEPS / GPU_CHECK_PROMPTS (empty: the benchmark's per-family defaults),
# GPU_CHECK_REPEATS (3), GPU_CHECK_FAMILIES ("pixart sana flux sd3"), GPU_CHECK_TESTS (1; 0 skips (a)),
# PYTHON (python). Results: $OUT/gpu_check.md (and each family's JSON and log) if OUT is set, else a
# temporary directory (printed). Needs only torch, diffusers, transformers, tokenizers and pytest
# importable: diffusers may come from PYTHONPATH (wheels unpacked with `pip install --target`); this
# checkout's src/ is put in front of it, so ditloc need not be installed.
# Exit status: 1 if a test or a benchmark failed, else 0 (missed goals are reported in the table).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SIZE="${GPU_CHECK_SIZE:-xl}"
DTYPE="${GPU_CHECK_DTYPE:-bfloat16}"
STEPS="${GPU_CHECK_STEPS:-}"
PROMPTS="${GPU_CHECK_PROMPTS:-}"
REPEATS="${GPU_CHECK_REPEATS:-3}"
FAMILIES="${GPU_CHECK_FAMILIES:-pixart sana flux sd3}"
RUN_TESTS="${GPU_CHECK_TESTS:-1}"
PYTHON="${PYTHON:-python}"
RESULTS="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$RESULTS"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

failed=0
tests_status=""
echo "gpu_check: device $DEVICE, size $SIZE, dtype $DTYPE, families: $FAMILIES; results in $RESULTS"
"$PYTHON" - "$DEVICE" <<'EOF'
import sys, torch, diffusers, transformers
device = torch.device(sys.argv[1])
available = device.type in ("cpu", "meta") or getattr(torch, device.type).is_available()
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}; "
      f"{device} available: {available}")
sys.exit(0 if available else f"gpu_check: no {device.type} device here")
EOF

# (a) exact invariants (withhold nothing = plain bit for bit, withhold everywhere = clean prompt,
#     inject everywhere = plain) and streaming contributions = naive attention maps, float32
TESTS=(
  tests/test_intervene.py::test_withhold_nothing_is_bit_identical
  tests/test_intervene.py::test_withhold_everywhere_equals_clean_prompt
  tests/test_intervene.py::test_inject_everywhere_is_plain
  tests/test_joint.py::test_withhold_nothing_is_bit_identical
  tests/test_joint.py::test_withhold_everywhere_with_clean_pooled_equals_clean_prompt
  tests/test_joint.py::test_inject_everywhere_is_plain
  tests/test_joint.py::test_streaming_matches_naive_joint_maps
  tests/test_contribution.py::test_localize_matches_naive_maps
  tests/test_gpu_paths.py::test_kernel_on_the_test_device
  tests/test_gpu_paths.py::test_host_reads_do_not_grow_with_steps
  tests/test_gpu_paths.py::test_clean_pass_stops_after_the_last_withheld_block
)
if [[ "$RUN_TESTS" != 0 ]]; then
  start=$SECONDS
  if DITLOC_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}" 2>&1 \
      | tee "$RESULTS/tests.log"; then
    passed="$(grep -Eo '[0-9]+ passed' "$RESULTS/tests.log" | tail -1 || true)"
    tests_status="passed on $DEVICE (${passed:-all passed}, $((SECONDS - start)) s)"
  else
    tests_status="FAILED on $DEVICE (see $RESULTS/tests.log)"
    failed=1
  fi
fi

# (b) the overhead benchmarks, one process per family (memory is returned between them)
for family in $FAMILIES; do
  rm -f "$RESULTS/$family.json"
  args=(--family "$family" --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" --repeats "$REPEATS"
        --json "$RESULTS/$family.json")
  if [[ -n "$STEPS" ]]; then args+=(--steps "$STEPS"); fi
  if [[ -n "$PROMPTS" ]]; then args+=(--prompts "$PROMPTS"); fi
  start=$SECONDS
  echo "== $family ($SIZE, $DTYPE)"
  if ! "$PYTHON" benchmarks/localize_overhead.py "${args[@]}" 2>&1 | tee "$RESULTS/$family.log"; then
    echo "gpu_check: the $family benchmark failed (log: $RESULTS/$family.log)"
    failed=1
  fi
  echo "   $family: $((SECONDS - start)) s"
done

# (c) one table
summary=(--summarize "$RESULTS" --families "$FAMILIES")
if [[ -n "$tests_status" ]]; then summary+=(--tests "$tests_status"); fi
echo
"$PYTHON" benchmarks/localize_overhead.py "${summary[@]}" | tee "$RESULTS/gpu_check.md"
echo
echo "gpu_check: $SECONDS s in all; table written to $RESULTS/gpu_check.md"
exit "$failed"
