#!/usr/bin/env bash
# Builds the emulated CUDA device into target/emulated-device/ and prints that folder on its last
# line: libcuda.so(.1), a stand-in for the CUDA driver (emulator/driver.cpp, with the
# kernel emulator and the crate's kernels compiled for the CPU), and libcublas.so(.13), a stand-in
# for cuBLAS (emulator/cublas.cpp). Put the folder first on LD_LIBRARY_PATH and cudarc
# loads them as it loads the real ones; the crate's code is the same. See docs/EMULATED-DEVICE.md.
#
# At build time it takes each kernel's registers, static shared memory and launch bounds from
# nvcc (`ptxas -v` for sm_90a, as the fatbin's H100 code is built), and the list of entry points
# cudarc can call from cudarc's own bindings (each one the stand-ins lack fails "not supported").
# Nothing is rebuilt when its inputs have not changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=$root/target/emulated-device
gen=$out/gen

if [ -z "${NVCC:-}" ]; then
  if command -v nvcc > /dev/null 2>&1; then
    NVCC=$(command -v nvcc)
  else
    NVCC=$(bash scripts/install-nvcc.sh | tail -n 1)
  fi
fi
nvcc_dir=$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)
include=$nvcc_dir/include
[ -f "$include/cuda.h" ] || { echo "build-emulated-device: no cuda.h in $include" >&2; exit 1; }

# cudarc's sources, as Cargo.lock pins them.
cudarc=$(cargo metadata --format-version 1 --locked 2> /dev/null | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(p["manifest_path"].rsplit("/", 1)[0])
        break
')
[ -d "$cudarc/src/driver/sys" ] || { echo "build-emulated-device: cudarc's sources not found" >&2; exit 1; }

stamp=$( (cat kernels/*.cu kernels/*.cuh emulator/*;
  "$NVCC" --version; echo "$cudarc"; g++ --version) | sha256sum | cut -c1-16)
if [ -f "$out/.stamp-$stamp" ] && [ -f "$out/libcuda.so.1" ] && [ -f "$out/libcublas.so.13" ]; then
  echo "emulated device up to date" >&2
  echo "$out"
  exit 0
fi
rm -rf "$out"
mkdir -p "$gen"

# The kernels as the fatbin's sm_90a code is built (build.rs), to read ptxas's figures.
for f in kernels/*.cu; do echo "#include \"$root/$f\""; done > "$gen/kernels.cu"
flags=(-O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -I"$root/kernels")
"$NVCC" -cubin "${flags[@]}" -Xptxas -v -o "$gen/kernels.cubin" "$gen/kernels.cu" > "$gen/ptxas.log" 2>&1 \
  || { cat "$gen/ptxas.log" >&2; exit 1; }
"$NVCC" -ptx "${flags[@]}" -o "$gen/kernels.ptx" "$gen/kernels.cu"
python3 emulator/emulated-device-gen.py resources "$gen/ptxas.log" "$gen/kernels.ptx" \
  "$gen/kernel_resources.cpp" >&2
python3 emulator/emulated-device-gen.py stubs "$cudarc" "$gen/driver_stubs.cpp" "$gen/cublas_stubs.cpp" >&2

common=(-std=c++17 -fPIC -I"$include" -I"$root/kernels" -pthread)
# The kernel emulator with the flags build.rs gives it (the same bits as the emulator feature).
g++ "${common[@]}" -O2 -DAPE_EMULATE -fno-strict-aliasing -Wno-unknown-pragmas \
  -c emulator/runtime.cpp -o "$gen/runtime.o" &
g++ "${common[@]}" -O2 -Wall -Wextra -Werror -c emulator/driver.cpp -o "$gen/driver.o" &
g++ "${common[@]}" -O3 -Wall -Wextra -Werror -c emulator/cublas.cpp -o "$gen/cublas.o" &
g++ "${common[@]}" -O1 -c "$gen/kernel_resources.cpp" -o "$gen/kernel_resources.o" &
g++ "${common[@]}" -O1 -c "$gen/driver_stubs.cpp" -o "$gen/driver_stubs.o" &
g++ "${common[@]}" -O1 -c "$gen/cublas_stubs.cpp" -o "$gen/cublas_stubs.o" &
for job in $(jobs -p); do wait "$job"; done

echo '{ global: cu*; ape_emu_dev_*; local: *; };' > "$gen/driver.map"
echo '{ global: cublas*; local: *; };' > "$gen/cublas.map"
g++ -shared -pthread -o "$out/libcuda.so.1" -Wl,-soname,libcuda.so.1 \
  -Wl,--version-script="$gen/driver.map" -Wl,-z,defs \
  "$gen/runtime.o" "$gen/driver.o" "$gen/kernel_resources.o" "$gen/driver_stubs.o"
ln -sf libcuda.so.1 "$out/libcuda.so"
g++ -shared -pthread -o "$out/libcublas.so.13" -Wl,-soname,libcublas.so.13 \
  -Wl,--version-script="$gen/cublas.map" -Wl,-z,defs -Wl,-rpath,'$ORIGIN' \
  "$gen/cublas.o" "$gen/cublas_stubs.o" -L"$out" -l:libcuda.so.1
ln -sf libcublas.so.13 "$out/libcublas.so"
touch "$out/.stamp-$stamp"
echo "emulated device built: $(nm -D --defined-only "$out/libcuda.so.1" | grep -c ' T cu') driver and" \
  "$(nm -D --defined-only "$out/libcublas.so.13" | grep -c ' T cublas') cuBLAS entry points" >&2
echo "$out"
