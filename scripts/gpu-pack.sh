#!/usr/bin/env bash
# Packs what a lent GPU machine needs into .gpupack/ (../shared/tools/gpu-pack.sh: a CUDA
# Release build, its binaries, the libraries a bare machine lacks, ../shared's data), then
# slims the pack under the device tool's 64 MiB carry limit: with ICU (the tokenizers'
# normalizers) and OpenBLAS the libraries alone are ~93 MiB. The duplicate libzo2 file and
# the Python module (the GPU checks do not import it) are dropped, and the largest libraries
# travel xz-compressed (~13 MiB for ~72 MiB), unpacked by .gpupack/run.sh on first use.
# Then, on the device:  .gpupack/run.sh scripts/gpu-check.sh "$OUT"   (carry [".gpupack"]).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
"$root/../shared/tools/gpu-pack.sh"
pack="$root/.gpupack"
# The binaries need libzo2 by its soname only.
soname=$(readelf -d "$pack/bin/zo2_tests" | sed -n 's/.*NEEDED.*\[\(libzo2\.so[^]]*\)\].*/\1/p' | head -1)
for f in "$pack"/lib/libzo2.so*; do
  [ "$(basename "$f")" = "$soname" ] || rm -f "$f"
done
rm -f "$pack"/lib/_zo2.cpython-*.so
big=()
for f in "$pack"/lib/*; do
  [ "$(stat -c %s "$f")" -gt $((2 * 1024 * 1024)) ] && [ "$(basename "$f")" != "$soname" ] && big+=("$(basename "$f")")
done
if [ ${#big[@]} -gt 0 ]; then
  tar cJf "$pack/libs.tar.xz" -C "$pack/lib" "${big[@]}"
  (cd "$pack/lib" && rm -f "${big[@]}")
  first=${big[0]}
  # run.sh unpacks them before anything runs (once per machine).
  sed -i "s|^here=\$(cd \"\$(dirname \"\$0\")\" \&\& pwd)\$|&\n[ -f \"\$here/libs.tar.xz\" ] \&\& [ ! -f \"\$here/lib/$first\" ] \&\& tar xJf \"\$here/libs.tar.xz\" -C \"\$here/lib\"|" "$pack/run.sh"
  grep -q 'libs.tar.xz' "$pack/run.sh" || { echo "gpu-pack: could not add the unpacking step to $pack/run.sh" >&2; exit 1; }
fi
size=$(du -sm "$pack" | cut -f1)
echo "slimmed .gpupack to ${size} MiB (compressed: ${big[*]:-none})"
[ "$size" -lt 60 ] || { echo "gpu-pack: .gpupack is ${size} MiB, over what the device tool carries (64 MiB with the tree)" >&2; exit 1; }
