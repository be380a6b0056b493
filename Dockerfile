# The node image cluster.yaml names: Ray 2.60's GPU image (CUDA, Python 3.11) with caldm and
# every dependency baked in and pinned, so nodes start without installing anything.
#
#   docker build -t caldm:0.1.0 .
#   docker tag caldm:0.1.0 <account>.dkr.ecr.us-east-1.amazonaws.com/caldm:0.1.0 && docker push ...
FROM rayproject/ray:2.60.0-py311-gpu

# torch: the CUDA build of the version CI pins on CPU (constraints.txt)
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

WORKDIR /home/ray/caldm
COPY --chown=ray:users docker/requirements.lock docker/requirements.lock
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && grep -v -E '^(deepspeed)==' docker/requirements.lock > /tmp/req.txt \
 && pip install --no-cache-dir -r /tmp/req.txt \
 # DeepSpeed's build imports torch: build it against the torch above, not an isolated one
 && pip install --no-cache-dir --no-build-isolation \
      "$(grep -E '^deepspeed==' docker/requirements.lock)"

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users caldm caldm
COPY --chown=ray:users jobs jobs
COPY --chown=ray:users tuning tuning
COPY --chown=ray:users benchmarks benchmarks
# no dependency resolution: everything above is already pinned
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "import caldm, torch, ray, deepspeed; print(caldm.__file__, torch.__version__)"
ENV PYTHONUNBUFFERED=1
