# CTest's check of zo2-bench's refusals and exit codes (bench/CMakeLists.txt,
# Bench.RefusesBadSweepsAndFailsOnFailedRows). Arguments (-D): BENCH (the zo2-bench
# executable), WORK (a scratch directory). Each case: the exit code (2 for a bad flag,
# 1 for a row that fails) and a piece of the message; a refused sweep leaves an existing
# --jsonl as it was; the disk probe never fills the disk or leaves its file; a --host-mem
# sweep leaves no block file behind.
cmake_minimum_required(VERSION 3.19)
foreach(v BENCH WORK)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "check_bench_errors.cmake: -D${v}=... is required")
  endif()
endforeach()
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})
set(common --presets opt-tiny --seq-len 8 --steps 1 --warmup 0 --mezo-baseline off --link-probe off -q)

function(expect want piece)
  execute_process(COMMAND ${BENCH} ${ARGN} WORKING_DIRECTORY ${WORK} RESULT_VARIABLE rc OUTPUT_VARIABLE out
                  ERROR_VARIABLE err)
  if(NOT rc EQUAL want)
    message(FATAL_ERROR "zo2-bench ${ARGN}: exit ${rc}, expected ${want}\n${out}${err}")
  endif()
  string(FIND "${out}${err}" "${piece}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "zo2-bench ${ARGN}: no '${piece}' in:\n${out}${err}")
  endif()
endfunction()

# Bad flags: exit 2, before any row.
expect(2 "--gpu-mem 0: must be larger than 0" ${common} --gpu-mem none,0)
expect(2 "--gpu-mem: " ${common} --gpu-mem none,abc)
expect(2 "--presets ',': name at least one value" --presets , -q)
expect(2 "--compute-dtype ',': name at least one value" --compute-dtype , -q)
expect(2 "--batch-size '1,': an empty item" ${common} --batch-size 1,)
expect(2 "--gpu-mem 'none,,4G': an empty item" ${common} --gpu-mem none,,4G)
expect(2 "--batch-size '3000000000': not an integer in [1, 10^9)" ${common} --batch-size 3000000000)
expect(2 "--seq-len '99999999999999999999': not an integer in [2, 10^9)" --presets opt-tiny --seq-len 99999999999999999999)
expect(2 "-1 is not a seed" ${common} --seed -1)
# Integer flags are decimal as written (Note [Decimal integers], tools/cli.h).
expect(2 "--warmup: 0x2 is not a whole number" --presets opt-tiny --seq-len 8 --steps 1 --warmup 0x2 -q)
expect(2 "--link-probe 1: at least 1M" --presets opt-tiny --seq-len 8 --link-probe 1 -q)
# An empty value is refused naming the flag (Note [Empty values], tools/cli.h): --jsonl ""
# and --plot "" were taken as left out, and the rows were written nowhere.
# (A function's ${ARGN} drops empty arguments: execute_process here, where a quoted "" stays.)
foreach(flag --jsonl --plot --parallel)
  execute_process(COMMAND ${BENCH} ${common} ${flag} "" WORKING_DIRECTORY ${WORK} RESULT_VARIABLE rc
                  OUTPUT_VARIABLE out ERROR_VARIABLE err)
  string(FIND "${out}${err}" "${flag}: an empty value" at)
  if(NOT rc EQUAL 2 OR at EQUAL -1)
    message(FATAL_ERROR "zo2-bench ${flag} '': exit ${rc}, expected 2 and '${flag}: an empty value' in:\n${out}${err}")
  endif()
endforeach()
expect(2 "--plot is for training rows, not --generate" ${common} --generate 2 --plot ${WORK}/g.png)
expect(2 "--host-mem is for training rows, not --generate" ${common} --generate 2 --host-mem 100K)

# A sweep refused after its output files were named leaves them as they were.
file(WRITE ${WORK}/rows.jsonl "{\"old\": 1}\n")
expect(2 "--mezo-baseline on: no Python that imports torch" --presets opt-tiny --seq-len 8 --jsonl ${WORK}/rows.jsonl
       --mezo-baseline on --python /bin/false --link-probe off -q)
file(READ ${WORK}/rows.jsonl kept)
if(NOT kept STREQUAL "{\"old\": 1}\n")
  message(FATAL_ERROR "a refused sweep changed --jsonl: '${kept}'")
endif()

# A sequence length beyond a preset's positions (opt-tiny: 64) is refused before any row.
expect(2 "--seq-len 128: preset opt-tiny has 64 positions" --presets opt-tiny --seq-len 128 --steps 1 --warmup 0
       --mezo-baseline off --link-probe off -q)
# Leading zeros and a '+' in the lists, as in every integer flag.
expect(0 "| opt-tiny |" --presets opt-tiny --seq-len 08 --batch-size +1 --steps 1 --warmup 0 --mezo-baseline off
       --link-probe off)
# A row that fails (a cap below what opt-tiny needs) fails the sweep: exit 1, its error in the table.
expect(1 "1 row(s) failed or exceeded their cap" --presets opt-tiny --seq-len 8 --gpu-mem 64K --steps 1 --warmup 0
       --mezo-baseline off --link-probe off -q)

# The disk probe refuses a file beyond the free space (1 EiB), and leaves no file.
expect(2 "does not fit the free space" --disk-probe --disk-dir ${WORK} --disk-probe-bytes 1048576T)
file(GLOB probes ${WORK}/.zo2-disk-probe-*)
if(probes)
  message(FATAL_ERROR "the disk probe left ${probes}")
endif()

# A --host-mem sweep removes the block file it made.
file(MAKE_DIRECTORY ${WORK}/blocks)
expect(0 "opt-tiny" ${common} --offload all --host-mem 400K --disk-staging 1 --disk-dir ${WORK}/blocks)
file(GLOB left ${WORK}/blocks/*)
if(left)
  message(FATAL_ERROR "a --host-mem sweep left ${left}")
endif()
