# Coordinator: Flower's official SuperLink image + fedseg's coordinator part (the ServerApp runs
# in a subprocess of the SuperLink, so its dependencies live here). Certificates are mounted.
# Build from the repository root: docker build -f docker/server.Dockerfile -t fedseg-server .
FROM flwr/superlink:1.42.0

USER root
# The run folder's mount point, owned by the non-root user, so the named volume starts writable.
RUN mkdir -p /runs && chown app:app /runs
WORKDIR /app
COPY --chown=app:app setup.py pyproject.toml README.md ./
COPY --chown=app:app common ./common
COPY --chown=app:app server ./server
RUN python -m pip install --no-cache-dir .

USER app
VOLUME ["/runs"]
ENTRYPOINT ["flower-superlink"]
