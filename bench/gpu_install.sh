# Source this first on the lent GPU machine (no network), from the repo root, with .whl/
# carried (made here by bench/gpu_wheels.sh):   source bench/gpu_install.sh
# --no-deps: nothing is resolved, so no second torch (or anything else already installed
# there) is pulled into /tmp/site; the project itself is used from the checkout via PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
