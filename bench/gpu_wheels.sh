#!/usr/bin/env bash
# Prepare .whl/ (repo root, git-ignored): the Python wheels that the lent GPU machine
# (no network; CPython 3.12, x86-64, manylinux; torch 2.11.0+cu130, transformers,
# peft, pyarrow, numpy, huggingface_hub, ... already installed) lacks to run this project.
#
#   bench/gpu_wheels.sh            # here, with network; idempotent (skips wheels already there)
#   source bench/gpu_install.sh    # there, first thing (installs .whl/ into /tmp/site)
#
# Versions come from requirements-lock.txt (the lock of .venv). Ray is deliberately NOT
# carried (too big for the 64 MiB that repo + wheels may take): the Ray pipeline and
# tests/test_cluster_config.py don't run there. antlr4-python3-runtime is not needed:
# omegaconf>=2.4 vendors it (omegaconf/vendor/antlr4) and does not require it.
#
# Environment: PYTHON (runs `pip download`, default python3), BUILD_PY (builds the
# sdist-only DeepSpeed with --no-build-isolation: needs setuptools>=70.1; default
# .venv/bin/python, made by `make test`), LIMIT_MIB (default 40).
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
LOCK=requirements-lock.txt
DEST=.whl
LIMIT_MIB=${LIMIT_MIB:-40}
PY=${PYTHON:-python3}
BUILD_PY=${BUILD_PY:-.venv/bin/python}

# Published as wheels: fetched for cp312 / manylinux x86_64 (pure-Python ones are py3-none-any).
#   diffusers -> importlib_metadata -> zipp, lazy-importer
#   webdataset -> braceexpand;  omegaconf;  deepspeed -> hjson, pydantic
#   pydantic -> pydantic-core (binary), annotated-types, typing-inspection, typing-extensions
# zipp and typing-extensions are on the GPU machine at an unknown version; they are
# carried (tiny) because importlib_metadata wants zipp>=3.20 and pydantic typing-extensions>=4.16.
BINARY=(diffusers importlib_metadata zipp lazy-importer
        webdataset braceexpand omegaconf
        hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions)
# Published as sdist only: built here into a pure-Python wheel.
SOURCE=(deepspeed)

# What the GPU machine already has (/work/.library/device/KINDS.md, "Python packages
# already there"), with the versions known from there; used to check the closure below.
GPU_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp"
GPU_VERSIONS="accelerate==1.15.0 huggingface-hub==1.33.0 numpy==2.5.2 safetensors==0.8.0
torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 triton==3.6.0 torchvision==0.26.0"

die() { echo "gpu_wheels.sh: ERROR: $*" >&2; exit 1; }
norm() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/-/g'; }

[ -f "$LOCK" ] || die "$LOCK not found at the repo root"
locked() {  # locked NAME -> version pinned in the lock
    local v
    v=$(awk -F'==' -v want="$(norm "$1")" '
        /^[[:space:]]*(#|-e |$)/ { next }
        { n = tolower($1); gsub(/[-_.]+/, "-", n); if (n == want && NF == 2) { print $2; exit } }' "$LOCK")
    [ -n "$v" ] || die "$1 is not pinned (NAME==VERSION) in $LOCK"
    echo "$v"
}
have() {  # have NAME VERSION: is the wheel already in $DEST? (removes other versions of NAME)
    local want=$(norm "$1") ver=$2 f base n v found=1
    for f in "$DEST"/*.whl; do
        [ -e "$f" ] || continue
        base=$(basename "$f"); n=${base%%-*}; v=${base#*-}; v=${v%%-*}
        [ "$(norm "$n")" = "$want" ] || continue
        if [ "$v" = "$ver" ]; then found=0
        else echo "removing $base (lock wants $1==$ver)"; rm -f "$f"
        fi
    done
    return $found
}

# 1. keep .whl/ out of git
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")" "$DEST"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || { echo '/.whl/' >> "$EXCLUDE"; echo "added /.whl/ to $EXCLUDE"; }

# 2. binary wheels for CPython 3.12, manylinux x86_64 (platform list as in the device README)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for name in "${BINARY[@]}"; do
    ver=$(locked "$name")
    if have "$name" "$ver"; then echo "have  $name==$ver"; continue; fi
    echo "fetch $name==$ver"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$name==$ver" \
        || die "no cp312/manylinux x86_64 (or pure-Python) wheel of $name==$ver on the index"
    have "$name" "$ver" || die "pip reported success but no $name-$ver wheel is in $DEST"
done

# 3. sdist-only packages: pure-Python wheel built here, no ops compiled (DeepSpeed JIT-builds
#    its ops at run time). DS_ACCELERATOR=cpu keeps setup.py from probing CUDA; the
#    accelerator is detected again at run time (what setup.py records only matters for
#    prebuilt ops, and DS_BUILD_OPS=0 prebuilds none).
for name in "${SOURCE[@]}"; do
    ver=$(locked "$name")
    if have "$name" "$ver"; then echo "have  $name==$ver"; continue; fi
    [ -x "$BUILD_PY" ] || die "BUILD_PY=$BUILD_PY not found (run \`make test\` to create .venv, or set BUILD_PY)"
    echo "build $name==$ver (from sdist, with $BUILD_PY)"
    DS_BUILD_OPS=0 DS_ACCELERATOR=cpu DS_BUILD_STRING= \
        "$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
        --no-binary "$name" -w "$DEST" "$name==$ver" \
        || die "building $name==$ver from its sdist failed"
    have "$name" "$ver" || die "no $name-$ver wheel in $DEST after the build"
done

# 4. check: every wheel installs on CPython 3.12 manylinux x86_64, one version per name, no Ray,
#    and every requirement (markers evaluated for 3.12/Linux, extras skipped) is carried or on
#    the GPU machine, at a version that satisfies it where the version is known.
"$PY" - "$DEST" "$GPU_HAS" "$GPU_VERSIONS" <<'EOF'
import email.parser, pathlib, sys, zipfile
try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

dest, gpu_has, gpu_versions = pathlib.Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
gpu = {canonicalize_name(n): None for n in gpu_has}
gpu.update({canonicalize_name(s.split("==")[0]): s.split("==")[1] for s in gpu_versions})
env = dict(python_version="3.12", python_full_version="3.12.3", implementation_name="cpython",
           platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
           platform_machine="x86_64", os_name="posix", extra="")
errors, carried, reqs = [], {}, {}
for whl in sorted(dest.glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(whl.name)
    if name in carried:
        errors.append(f"two versions of {name}: {carried[name]} and {version} (pip install fails)")
    carried[name] = str(version)
    if name == "ray":
        errors.append(f"{whl.name}: Ray must not be carried (too big)")
    if not any(t.interpreter in ("py3", "cp312") and t.abi in ("none", "cp312", "abi3")
               and (t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("_x86_64")))
               for t in tags):
        errors.append(f"{whl.name}: not installable on CPython 3.12 manylinux x86_64")
    with zipfile.ZipFile(whl) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
        if all(t.platform == "any" for t in tags):
            binaries = [n for n in z.namelist() if n.endswith((".so", ".pyd", ".dll"))]
            if binaries:
                errors.append(f"{whl.name}: tagged pure-Python but holds {binaries[:3]}")
    rp = meta.get("Requires-Python")
    if rp and not SpecifierSet(rp).contains("3.12.3"):
        errors.append(f"{whl.name}: Requires-Python {rp} excludes 3.12")
    reqs[name] = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
for name, rs in reqs.items():
    for r in rs:
        if r.marker is not None and not r.marker.evaluate(env):
            continue  # extras and other platforms/Pythons
        dep = canonicalize_name(r.name)
        have = carried.get(dep, gpu.get(dep, "absent") if dep in gpu else "absent")
        if have == "absent":
            errors.append(f"{name} needs {r}: neither carried nor on the GPU machine")
        elif have is not None and r.specifier and not r.specifier.contains(have, prereleases=True):
            where = "carried" if dep in carried else "on the GPU machine"
            errors.append(f"{name} needs {r}, but {dep} {have} is {where}")
if errors:
    print("gpu_wheels.sh: ERROR: the wheels in .whl/ do not form a working set:", *errors, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"closure ok: {len(carried)} wheels; every requirement is carried or on the GPU machine")
EOF

# 5. sizes
echo "wheels in $DEST/:"
total=0
for f in "$DEST"/*.whl; do
    s=$(stat -c %s "$f"); total=$((total + s))
    awk -v s="$s" -v f="$(basename "$f")" 'BEGIN { printf "  %8.2f MiB  %s\n", s / 1048576, f }'
done
limit=$((LIMIT_MIB * 1048576))
awk -v t="$total" -v d="$DEST" -v l="$LIMIT_MIB" \
    'BEGIN { printf "total: %.2f MiB in %s/ (limit %s MiB; repo + wheels must fit in 64 MiB)\n", t / 1048576, d, l }'
[ "$total" -le "$limit" ] || die "$DEST/ holds $total bytes, over the ${LIMIT_MIB} MiB limit"
