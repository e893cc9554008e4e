# On the lent GPU machine, from the repository root: the wheels it lacks (monai, nibabel,
# connected-components-3d, for Python 3.12, in .whl/) and volumes prepared here in .gpu/volumes.npz
# travel with the tree (64 MiB in all). $1: seconds to train; $2 $3: VAE and UNet batch.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
python3 benchmarks/gpu/backbone_lease.py .gpu/volumes.npz "$1" cuda $2 $3 2>&1 | grep -v "━" | tee $OUT/log.txt
ls -la $OUT $OUT/work
