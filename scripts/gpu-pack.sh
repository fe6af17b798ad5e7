#!/usr/bin/env bash
# Packs what a lent GPU machine needs into .gpupack/ (../shared/tools/gpu-pack.sh: a CUDA
# Release build, its binaries, the libraries a bare machine lacks, ../shared's data), then
# slims the pack under the device tool's 64 MiB carry limit: with ICU (the tokenizers'
# normalizers) and OpenBLAS the libraries alone are ~93 MiB. The duplicate libzo2 file and
# the Python module (the GPU checks do not import it) are dropped, and the largest libraries
# and programs travel xz-compressed, unpacked by .gpupack/run.sh on first use.
# Then, on the device:  .gpupack/run.sh scripts/gpu-check.sh "$OUT"   (carry [".gpupack"]).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
"$root/../shared/tools/gpu-pack.sh"
pack="$root/.gpupack"
# The C hosts (zo2_capi_test, ...) need libzo2 by its soname only; zo2's own programs hold
# zo2_core themselves (Note [One library, exporting only the C API] in CMakeLists.txt).
soname=""
for f in "$pack"/lib/libzo2.so*; do
  [ -f "$f" ] && soname=$(readelf -d "$f" | sed -n 's/.*SONAME.*\[\(libzo2\.so[^]]*\)\].*/\1/p' | head -1)
  [ -n "$soname" ] && break
done
for f in "$pack"/lib/libzo2.so*; do
  [ "$(basename "$f")" = "$soname" ] || rm -f "$f"
done
rm -f "$pack"/lib/_zo2.cpython-*.so
# Every file above 2 MiB, libraries and programs alike (each program holds zo2_core and its
# CUDA kernels), travels in one xz archive of paths below .gpupack.
big=()
for f in "$pack"/lib/* "$pack"/bin/*; do
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((2 * 1024 * 1024)) ] && big+=("${f#"$pack"/}")
done
if [ ${#big[@]} -gt 0 ]; then
  tar cJf "$pack/big.tar.xz" -C "$pack" "${big[@]}"
  (cd "$pack" && rm -f "${big[@]}")
  first=${big[0]}
  # run.sh unpacks them before anything runs (once per machine).
  sed -i "s|^here=\$(cd \"\$(dirname \"\$0\")\" \&\& pwd)\$|&\n[ -f \"\$here/big.tar.xz\" ] \&\& [ ! -f \"\$here/$first\" ] \&\& tar xJf \"\$here/big.tar.xz\" -C \"\$here\"|" "$pack/run.sh"
  grep -q 'big.tar.xz' "$pack/run.sh" || { echo "gpu-pack: could not add the unpacking step to $pack/run.sh" >&2; exit 1; }
fi
size=$(du -sm "$pack" | cut -f1)
echo "slimmed .gpupack to ${size} MiB (compressed: ${big[*]:-none})"
[ "$size" -lt 60 ] || { echo "gpu-pack: .gpupack is ${size} MiB, over what the device tool carries (64 MiB with the tree)" >&2; exit 1; }
